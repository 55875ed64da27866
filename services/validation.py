"""Checks every field of a generate request before it reaches the engine.

All violations are collected, so one INVALID_ARGUMENT names every bad field.
Field names are paths in the request message (`params.top_p`); a caller that
embeds a GenerateRequest (SubmitJob) passes a prefix such as `request.`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from twolane.models.chat import ChatTemplateError
from twolane.scheduler.request import SamplingParams
from twolane.services import convert
from twolane.services.errors import FieldViolation, InvalidArgumentError
from twolane.services.prompts import ChatUnavailableError, PromptEncoder
from twolane.v1 import generate_pb2

# Bounds on what one request may carry; past them the answer names the field.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 1024

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
    prompts: PromptEncoder,
    *,
    prefix: str = "",
) -> ValidRequest:
    """Return the request in engine terms, or raise InvalidArgumentError.

    The prompt is tokenized here, once; the token ids travel on in the ValidRequest.
    """
    violations: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        violations.append(FieldViolation(prefix + field, description))

    prompt_token_ids = _check_prompt(request, limits, prompts, bad)
    _check_params(request.params, limits, bad)
    if violations:
        raise InvalidArgumentError(violations)
    params = convert.sampling_params(request.params)
    if request.messages:
        # A chat reply ends with the assistant's turn, whatever the model's EOS is.
        extra = [t for t in prompts.chat_stop_token_ids if t not in params.stop_token_ids]
        params = msgspec.structs.replace(params, stop_token_ids=(*params.stop_token_ids, *extra))
    return ValidRequest(prompt_token_ids, params)


def _check_prompt(
    request: GenerateMessage,
    limits: ModelLimits,
    prompts: PromptEncoder,
    bad: Callable[[str, str], None],
) -> list[int]:
    given = [
        name
        for name, is_set in (
            ("prompt", bool(request.prompt)),
            ("prompt_token_ids", bool(request.prompt_token_ids)),
            ("messages", bool(request.messages)),
        )
        if is_set
    ]
    if len(given) > 1:
        bad(given[-1], f"set exactly one of prompt, prompt_token_ids and messages, not {given}")
        return []
    if not given:
        bad("prompt", "the prompt is empty; set prompt, prompt_token_ids or messages")
        return []
    field = given[0]
    if field == "prompt_token_ids":
        token_ids = list(request.prompt_token_ids)
        outside = _first_outside_vocab(token_ids, limits.vocab_size)
        if outside is not None:
            bad(field, outside)
            return []
    elif field == "messages":
        token_ids = _encode_chat(request, prompts, bad)
        if token_ids is None:
            return []
    else:
        token_ids = prompts.encode(request.prompt)
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


def _encode_chat(
    request: GenerateMessage, prompts: PromptEncoder, bad: Callable[[str, str], None]
) -> list[int] | None:
    if len(request.messages) > MAX_MESSAGES:
        bad("messages", f"at most {MAX_MESSAGES} messages, got {len(request.messages)}")
        return None
    for index, message in enumerate(request.messages):
        if not message.role:
            bad(f"messages[{index}].role", "every message needs a role (system, user, ...)")
            return None
    try:
        return prompts.encode_chat([(m.role, m.content) for m in request.messages])
    except (ChatUnavailableError, ChatTemplateError) as exc:
        bad("messages", str(exc))
        return None


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
    if any(len(s) > MAX_STOP_STRING_CHARS for s in params.stop):
        bad("params.stop", f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters")
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        bad(
            "params.stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(params.stop_token_ids)}",
        )
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
