"""Checks every field of a generate request before it reaches the engine.

All violations are collected, so one INVALID_ARGUMENT names every bad field.
Field names are paths in the request message (`params.top_p`); a caller that
embeds a GenerateRequest (SubmitJob) passes a prefix such as `request.`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
from google.protobuf import descriptor, duration_pb2, timestamp_pb2
from google.protobuf.message import Message

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
# No tokenizer packs more characters than this into one token on average, so a longer
# prompt cannot fit the context, and is refused before it costs any tokenizing.
MAX_CHARS_PER_TOKEN = 32

# The ranges protobuf defines for its well-known time types (years 1 to 9999 for a
# Timestamp, about ten thousand years either way for a Duration).
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799
MAX_DURATION_S = 315_576_000_000
NANOS_PER_SECOND = 1_000_000_000

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
    too_long = _too_long_to_encode(request, limits)
    if too_long is not None:
        bad(field, too_long)
        return []
    if field == "prompt_token_ids":
        token_ids = list(request.prompt_token_ids)
        # Length first: a prompt too long to run is refused before its ids are read.
        outside = None
        if len(token_ids) < limits.max_model_len:
            outside = _first_outside_vocab(token_ids, limits.vocab_size)
        if outside is not None:
            bad(field, outside)
            return []
    elif field == "messages":
        chat_ids = _encode_chat(request, prompts, bad)
        if chat_ids is None:
            return []
        token_ids = chat_ids
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


def _too_long_to_encode(request: GenerateMessage, limits: ModelLimits) -> str | None:
    """Why the prompt cannot fit the context whatever its tokens, or None."""
    if len(request.messages) > limits.max_model_len:
        return (
            f"{len(request.messages)} messages cannot fit the model's context length "
            f"{limits.max_model_len}"
        )
    num_chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    if num_chars > limits.max_model_len * MAX_CHARS_PER_TOKEN:
        return (
            f"the prompt is {num_chars} characters; it cannot fit the model's context "
            f"length {limits.max_model_len}"
        )
    return None


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
    else:
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


def check_times(message: Message, bad: Callable[[str, str], None], prefix: str = "") -> None:
    """Check every Timestamp and Duration set in `message`, at any depth, against the range
    protobuf defines for it: out of range, converting one raises."""
    for field, value in message.ListFields():
        if field.message_type is None or not _holds_times(field.message_type):
            continue
        values = value if field.is_repeated else [value]
        for index, item in enumerate(values):
            name = prefix + field.name + (f"[{index}]" if field.is_repeated else "")
            if isinstance(item, timestamp_pb2.Timestamp):
                _check_timestamp(item, name, bad)
            elif isinstance(item, duration_pb2.Duration):
                _check_duration(item, name, bad)
            else:
                check_times(item, bad, name + ".")


@functools.cache
def _holds_times(message_type: descriptor.Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold a Timestamp or a Duration anywhere."""
    if message_type.full_name in (
        timestamp_pb2.Timestamp.DESCRIPTOR.full_name,
        duration_pb2.Duration.DESCRIPTOR.full_name,
    ):
        return True
    seen = seen | {message_type.full_name}
    return any(
        field.message_type is not None
        and field.message_type.full_name not in seen
        and _holds_times(field.message_type, seen)
        for field in message_type.fields
    )


def _check_timestamp(
    stamp: timestamp_pb2.Timestamp, field: str, bad: Callable[[str, str], None]
) -> None:
    if not MIN_TIMESTAMP_S <= stamp.seconds <= MAX_TIMESTAMP_S:
        bad(f"{field}.seconds", f"must be within years 1 to 9999, got {stamp.seconds}")
    if not 0 <= stamp.nanos < NANOS_PER_SECOND:
        bad(f"{field}.nanos", f"must be in [0, {NANOS_PER_SECOND}), got {stamp.nanos}")


def _check_duration(
    duration: duration_pb2.Duration, field: str, bad: Callable[[str, str], None]
) -> None:
    if not -MAX_DURATION_S <= duration.seconds <= MAX_DURATION_S:
        bad(f"{field}.seconds", f"must be within +-{MAX_DURATION_S}, got {duration.seconds}")
    if not -NANOS_PER_SECOND < duration.nanos < NANOS_PER_SECOND:
        bad(f"{field}.nanos", f"must be in (-{NANOS_PER_SECOND}, {NANOS_PER_SECOND})")
    elif duration.seconds * duration.nanos < 0:
        bad(f"{field}.nanos", "must have the sign of seconds")
