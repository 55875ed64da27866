"""The lines of a batch input file (OpenAI Batch API JSONL), each checked on its own.

Every line is looked at before anything runs, and a bad line never stops the others:
it comes back as a `BadLine` naming its line number, its `custom_id` (when it has one)
and every bad field. The Batch API and `twolane batch` read files through here, with
the same request models and the same translation as the HTTP front's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from twolane.services.errors import FieldViolation, InvalidArgumentError
from twolane.services.openai_schema import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    ENDPOINTS,
    BatchLine,
    ChatCompletionRequest,
    CompletionRequest,
    generate_requests,
    parse,
)
from twolane.v1 import generate_pb2

MAX_LINES = 50_000  # requests per batch, as OpenAI's Batch API


@dataclass(frozen=True)
class GoodLine:
    number: int  # 1-based, in the file
    custom_id: str
    endpoint: str
    request: generate_pb2.GenerateRequest
    return_token_ids: bool = False


@dataclass(frozen=True)
class BadLine:
    number: int
    custom_id: str | None
    violations: tuple[FieldViolation, ...]
    status_code: int = 400
    code: str = "invalid_request"

    @property
    def message(self) -> str:
        return "; ".join(f"{v.field}: {v.description}" for v in self.violations)

    @property
    def param(self) -> str | None:
        return self.violations[0].field if self.violations else None

    def describe(self) -> str:
        named = f" (custom_id {self.custom_id!r})" if self.custom_id else ""
        return f"line {self.number}{named}: {self.message}"


Line = GoodLine | BadLine


def parse_lines(
    text: str,
    endpoint: str | None = None,
    *,
    served_model: str | None = None,
    default_max_tokens: int | None = None,
    default_chat_max_tokens: int | None = None,
    flat: bool = False,
) -> list[Line]:
    """Every non-empty line of `text`, good or bad, in file order.

    Args:
        endpoint: the batch's endpoint, which every line must fit; None takes each
            line's `url`, or chat when its body has `messages`.
        served_model: where given, a line's `body.model` must name it.
        default_max_tokens: set on lines that give no limit (else OpenAI's defaults).
        default_chat_max_tokens: a chat line's limit when it gives none.
        flat: also take lines without `body` whose request fields sit beside
            `custom_id` (`twolane batch` has always read those).
    """
    lines: list[Line] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = parse_line(
            raw, number, endpoint, served_model, default_max_tokens, default_chat_max_tokens, flat
        )
        custom_id = line.custom_id
        if custom_id is not None:
            if custom_id in first_seen:
                where = first_seen[custom_id]
                line = BadLine(
                    number,
                    custom_id,
                    (FieldViolation("custom_id", f"repeats the one on line {where}"),),
                )
            else:
                first_seen[custom_id] = number
        lines.append(line)
    return lines


def parse_line(
    raw: str,
    number: int,
    endpoint: str | None = None,
    served_model: str | None = None,
    default_max_tokens: int | None = None,
    default_chat_max_tokens: int | None = None,
    flat: bool = False,
) -> Line:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        violation = FieldViolation("line", f"not JSON ({exc})")
        return BadLine(number, None, (violation,), code="invalid_json")
    if not isinstance(row, dict):
        return BadLine(
            number, None, (FieldViolation("line", "not a JSON object"),), code="invalid_json"
        )
    custom_id = row.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) and custom_id else None
    if flat and "body" not in row:
        outer = {k: row[k] for k in ("custom_id", "method", "url") if k in row}
        row = {**outer, "body": {k: v for k, v in row.items() if k not in outer}}
    try:
        line = parse(BatchLine, row)
        url = _endpoint(line, endpoint)
        body = dict(line.body)
        if default_max_tokens is not None and not {"max_tokens", "max_completion_tokens"} & set(
            body
        ):
            body["max_tokens"] = default_max_tokens
        model = ChatCompletionRequest if url == CHAT_COMPLETIONS else CompletionRequest
        request = parse(model, body, prefix="body.")
        if served_model is not None and request.model not in (None, served_model):
            return BadLine(
                number,
                custom_id,
                (
                    FieldViolation(
                        "body.model",
                        f"the model {request.model!r} does not exist; this server serves "
                        f"{served_model!r}",
                    ),
                ),
                status_code=404,
                code="model_not_found",
            )
        problems = []
        if request.n != 1:
            problems.append(FieldViolation("body.n", "a batch line asks for one completion"))
        if request.stream:
            problems.append(FieldViolation("body.stream", "a batch line cannot stream"))
        (generate,) = _one_prompt(request, default_chat_max_tokens, problems)
        if problems:
            raise InvalidArgumentError(problems)
    except InvalidArgumentError as exc:
        return BadLine(number, custom_id, exc.violations)
    return GoodLine(number, line.custom_id, url, generate, request.return_token_ids)


def _endpoint(line: BatchLine, endpoint: str | None) -> str:
    if line.url is not None and line.url not in ENDPOINTS:
        raise InvalidArgumentError(
            [FieldViolation("url", f"must be one of {', '.join(ENDPOINTS)}")]
        )
    if endpoint is not None:
        if line.url not in (None, endpoint):
            raise InvalidArgumentError(
                [FieldViolation("url", f"{line.url} is not this batch's endpoint {endpoint}")]
            )
        return endpoint
    if line.url is not None:
        return line.url
    return CHAT_COMPLETIONS if "messages" in line.body else COMPLETIONS


def _one_prompt(
    request: CompletionRequest | ChatCompletionRequest,
    default_chat_max_tokens: int | None,
    problems: list[FieldViolation],
) -> list[generate_pb2.GenerateRequest]:
    try:
        requests = generate_requests(request, default_chat_max_tokens, prefix="body.")
    except InvalidArgumentError as exc:
        problems.extend(exc.violations)
        return [generate_pb2.GenerateRequest()]
    if len(requests) != 1:
        problems.append(FieldViolation("body.prompt", "a batch line has one prompt"))
        return [requests[0]]
    return requests
