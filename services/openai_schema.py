"""The OpenAI API's request bodies as pydantic models, and their translation to twolane's.

A field this server does not know or does not support is refused (`extra="forbid"`), so
a client never believes a parameter took effect when it did not. Only the shape is
checked here; the values go on as a `GenerateRequest` to `validate_generate`, the one
rule set every front shares (gRPC, HTTP, batch lines, `twolane batch`).

twolane's extensions, as other servers offer them: `top_k` (0 turns it off),
`ignore_eos`, and `return_token_ids` (each choice then carries its `token_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from twolane.services.errors import FieldViolation, InvalidArgumentError
from twolane.v1 import generate_pb2

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)
MAX_CHOICES = 16  # most choices (`n` times the prompts) one request may ask for
OPENAI_DEFAULT_MAX_TOKENS = 16  # of /v1/completions; chat runs to the context's end
OPENAI_DEFAULT_TEMPERATURE = 1.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the caller's end-user id; accepted and not used
    top_k: int = 0
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = OPENAI_DEFAULT_MAX_TOKENS
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class BatchLine(_Body):
    """One line of a batch input file. `method` and `url` may be left out (`twolane
    batch` takes the endpoint from the body); where given they must fit the batch."""

    custom_id: str = Field(min_length=1, max_length=256)
    method: Literal["POST"] = "POST"
    url: str | None = None
    body: dict[str, Any]


class CreateBatchRequest(_Body):
    input_file_id: str
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None


Request = CompletionRequest | ChatCompletionRequest


def parse(model: type[BaseModel], data: bytes | str | dict[str, Any], prefix: str = "") -> Any:
    """`data` as `model`, or InvalidArgumentError naming every bad field."""
    try:
        if isinstance(data, dict):
            return model.model_validate(data)
        return model.model_validate_json(data)
    except pydantic.ValidationError as exc:
        raise InvalidArgumentError(violations(exc, prefix)) from None


def violations(exc: pydantic.ValidationError, prefix: str = "") -> list[FieldViolation]:
    found = []
    for error in exc.errors(include_url=False):
        field = prefix + _path(error["loc"])
        if error["type"] == "extra_forbidden":
            description = "unknown or unsupported field"
        elif error["type"] == "missing":
            description = "required"
        elif error["type"] == "json_invalid":
            field, description = prefix.rstrip(".") or "body", f"not valid JSON: {error['msg']}"
        else:
            description = error["msg"]
        found.append(FieldViolation(field or "body", description))
    # A union reports each of its branches; one line per field is enough.
    unique = {v.field: v for v in reversed(found)}
    return [v for v in found if unique.get(v.field) is v]


_UNION_BRANCHES = frozenset({"str", "int", "float", "bool", "bytes", "none"})


def _path(loc: Sequence[int | str]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif "[" in item or "-" in item or item in _UNION_BRANCHES:
            continue  # a union branch's name (`str`, `list[int]`), not a field
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


# ---- to twolane's requests -----------------------------------------------------------


def generate_requests(
    body: Request, default_chat_max_tokens: int | None, prefix: str = ""
) -> list[generate_pb2.GenerateRequest]:
    """One GenerateRequest per prompt (a chat has one); `n` copies are the caller's.

    `default_chat_max_tokens` is a chat's limit when it sets none (None: the engine's
    default). Raises InvalidArgumentError for what the shape allows but twolane does not.
    """
    problems: list[FieldViolation] = []
    if not 1 <= body.n <= MAX_CHOICES:
        problems.append(FieldViolation(prefix + "n", f"must be in [1, {MAX_CHOICES}]"))
    params = _sampling_params(body, default_chat_max_tokens, prefix, problems)
    if isinstance(body, ChatCompletionRequest):
        request = generate_pb2.GenerateRequest(params=params)
        for message in body.messages:
            request.messages.add(role=message.role, content=message.text())
        requests = [request]
    else:
        requests = []
        for prompt in body.prompts():
            request = generate_pb2.GenerateRequest(params=params)
            if isinstance(prompt, str):
                request.prompt = prompt
            else:
                request.prompt_token_ids.extend(prompt)
            requests.append(request)
        if not requests:
            problems.append(FieldViolation(prefix + "prompt", "give at least one prompt"))
        elif 1 <= body.n <= MAX_CHOICES < len(requests) * body.n:  # a bad n is said above
            problems.append(
                FieldViolation(
                    prefix + "prompt", f"prompts times n is at most {MAX_CHOICES} per request"
                )
            )
    if problems:
        raise InvalidArgumentError(problems)
    return requests


def _sampling_params(
    body: Request,
    default_chat_max_tokens: int | None,
    prefix: str,
    problems: list[FieldViolation],
) -> generate_pb2.SamplingParams:
    temperature = OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    params = generate_pb2.SamplingParams(
        temperature=temperature, top_k=body.top_k, ignore_eos=body.ignore_eos
    )
    if isinstance(body, ChatCompletionRequest):
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        if max_tokens is None:
            max_tokens = default_chat_max_tokens
        params.logprobs = body.logprobs
        if body.top_logprobs:
            problems.append(
                FieldViolation(
                    prefix + "top_logprobs",
                    "alternatives are not returned; logprobs gives the chosen tokens' own",
                )
            )
    else:
        max_tokens = body.max_tokens
        if body.logprobs:
            problems.append(
                FieldViolation(
                    prefix + "logprobs",
                    "only 0 is supported: the chosen tokens' log probabilities, no alternatives",
                )
            )
        params.logprobs = body.logprobs is not None
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if body.top_p is not None:
        params.top_p = body.top_p
    if body.seed is not None:
        params.seed = body.seed
    if body.stop is not None:
        params.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    return params


def openai_field(field: str) -> str:
    """The OpenAI name of a field the validator names by its place in GenerateRequest."""
    for twolane, openai in (("params.", ""), ("prompt_token_ids", "prompt")):
        field = field.replace(twolane, openai)
    return field
