"""Checks every field of a generate request before it reaches the engine.

All violations are collected, so one INVALID_ARGUMENT names every bad field.
Field names are paths in the request message (`params.top_p`); a caller that
embeds a GenerateRequest (SubmitJob) passes a prefix such as `request.`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twolane.scheduler.request import SamplingParams
from twolane.services import convert
from twolane.services.errors import FieldViolation, InvalidArgumentError
from twolane.v1 import generate_pb2

MAX_STOP_STRINGS = 16

GenerateMessage = generate_pb2.GenerateRequest | generate_pb2.GenerateStreamRequest


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class ValidRequest:
    """A checked request in the engine's terms."""

    prompt_token_ids: list[int]
    params: SamplingParams


def validate_generate(
    request: GenerateMessage,
    limits: ModelLimits,
    tokenize: Callable[[str], list[int]],
    *,
    prefix: str = "",
) -> ValidRequest:
    """Return the request in engine terms, or raise InvalidArgumentError."""
    violations: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        violations.append(FieldViolation(prefix + field, description))

    prompt_token_ids = _check_prompt(request, limits, tokenize, bad)
    _check_params(request.params, limits, bad)
    if violations:
        raise InvalidArgumentError(violations)
    return ValidRequest(prompt_token_ids, convert.sampling_params(request.params))


def _check_prompt(
    request: GenerateMessage,
    limits: ModelLimits,
    tokenize: Callable[[str], list[int]],
    bad: Callable[[str, str], None],
) -> list[int]:
    if request.prompt and request.prompt_token_ids:
        bad("prompt_token_ids", "set either prompt or prompt_token_ids, not both")
        return []
    if not request.prompt and not request.prompt_token_ids:
        bad("prompt", "the prompt is empty; set prompt or prompt_token_ids")
        return []
    if request.prompt_token_ids:
        field, token_ids = "prompt_token_ids", list(request.prompt_token_ids)
        outside = _first_outside_vocab(token_ids, limits.vocab_size)
        if outside is not None:
            bad(field, outside)
            return []
    else:
        field, token_ids = "prompt", tokenize(request.prompt)
        if not token_ids:
            bad(field, "the prompt encodes to no tokens")
            return []
    if len(token_ids) >= limits.max_model_len:
        bad(
            field,
            f"the prompt is {len(token_ids)} tokens; the model's context length is "
            f"{limits.max_model_len}, which leaves no room to generate",
        )
    return token_ids


def _check_params(
    params: generate_pb2.SamplingParams,
    limits: ModelLimits,
    bad: Callable[[str, str], None],
) -> None:
    if params.HasField("max_tokens"):
        if params.max_tokens <= 0:
            bad("params.max_tokens", f"must be > 0, got {params.max_tokens}")
        elif params.max_tokens > limits.max_model_len:
            bad(
                "params.max_tokens",
                f"{params.max_tokens} is past the model's context length {limits.max_model_len}",
            )
    if not math.isfinite(params.temperature) or params.temperature < 0:
        bad("params.temperature", f"must be a finite number >= 0, got {params.temperature}")
    if params.HasField("top_p") and not (math.isfinite(params.top_p) and 0.0 < params.top_p <= 1.0):
        bad("params.top_p", f"must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        bad("params.top_k", f"must be >= 0 (0 turns it off), got {params.top_k}")
    if len(params.stop) > MAX_STOP_STRINGS:
        bad("params.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(params.stop)}")
    if any(not s for s in params.stop):
        bad("params.stop", "stop strings must be non-empty")
    outside = _first_outside_vocab(params.stop_token_ids, limits.vocab_size)
    if outside is not None:
        bad("params.stop_token_ids", outside)


def _first_outside_vocab(token_ids: Sequence[int], vocab_size: int) -> str | None:
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            return (
                f"token id {token_id} at index {index} is outside the vocabulary [0, {vocab_size})"
            )
    return None
