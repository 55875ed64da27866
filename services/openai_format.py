"""twolane's results in the OpenAI API's shapes: completion and chat objects, stream
chunks, errors, and the lines of a batch's output and error files.

The HTTP front, the Batch API and `twolane batch` all write through these functions,
so a result reads the same whichever way it was asked for.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twolane.services.generation import RequestOutput
from twolane.services.openai_schema import CHAT_COMPLETIONS
from twolane.v1 import generate_pb2

TokenText = Callable[[int], str]  # a token id as text, for logprobs

_FINISH_REASONS = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass(frozen=True)
class Reply:
    """What a response is about: its id, endpoint and model, and the options that shape it.

    `n` is the choices per prompt: choice `i * n + j` is prompt i's j-th.
    """

    id: str
    endpoint: str
    model: str
    created: int
    n: int = 1
    logprobs: bool = False
    return_token_ids: bool = False

    @property
    def is_chat(self) -> bool:
        return self.endpoint == CHAT_COMPLETIONS


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == CHAT_COMPLETIONS else "cmpl-") + secrets.token_hex(16)


def finish_reason(reason: generate_pb2.FinishReason.ValueType) -> str | None:
    return _FINISH_REASONS.get(reason)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response_body(
    reply: Reply, results: Sequence[generate_pb2.GenerateResponse], token_text: TokenText | None
) -> dict[str, Any]:
    """The whole (non-streamed) completion or chat completion object."""
    choices = []
    for index, result in enumerate(results):
        choice: dict[str, Any] = {"index": index}
        if reply.is_chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice["logprobs"] = (
            _logprobs(reply, list(result.token_ids), list(result.logprobs), token_text, 0)
            if reply.logprobs
            else None
        )
        choice["finish_reason"] = finish_reason(result.finish_reason)
        if reply.return_token_ids:
            choice["token_ids"] = list(result.token_ids)
        choices.append(choice)
    firsts = results[:: reply.n]  # the prompt is counted once per prompt, not per choice
    return {
        "id": reply.id,
        "object": "chat.completion" if reply.is_chat else "text_completion",
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": usage(
            sum(r.usage.prompt_tokens for r in firsts),
            sum(r.usage.completion_tokens for r in results),
            sum(r.usage.cached_tokens for r in firsts),
        ),
    }


def _logprobs(
    reply: Reply,
    token_ids: list[int],
    logprobs: list[float],
    token_text: TokenText | None,
    text_offset: int,
) -> dict[str, Any]:
    texts = [token_text(t) for t in token_ids] if token_text is not None else None
    if reply.is_chat:
        return {
            "content": [
                {
                    "token": texts[i] if texts else "",
                    "logprob": logprob,
                    "bytes": list(texts[i].encode()) if texts else None,
                    "top_logprobs": [],
                }
                for i, logprob in enumerate(logprobs)
            ]
        }
    offsets = []
    for text in texts or []:
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": texts or [],
        "token_logprobs": logprobs,
        "top_logprobs": None,
        "text_offset": offsets,
    }


@dataclass
class ChoiceStream:
    """What a stream has sent of one choice so far."""

    started: bool = False
    num_chars: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


def chunk(
    reply: Reply,
    index: int,
    out: RequestOutput,
    sent: ChoiceStream,
    token_text: TokenText | None,
    include_usage: bool,
) -> dict[str, Any]:
    """One streamed update of choice `index` (a chat's first one also names the role)."""
    choice: dict[str, Any] = {"index": index}
    if reply.is_chat:
        delta: dict[str, Any] = {} if sent.started else {"role": "assistant"}
        if out.new_text or not sent.started:
            delta["content"] = out.new_text
        choice["delta"] = delta
    else:
        choice["text"] = out.new_text
    choice["logprobs"] = (
        _logprobs(reply, out.new_token_ids, out.new_logprobs, token_text, sent.num_chars)
        if reply.logprobs
        else None
    )
    choice["finish_reason"] = _engine_finish(out) if out.finished else None
    if reply.return_token_ids:
        choice["token_ids"] = out.new_token_ids
    sent.started = True
    sent.num_chars += len(out.new_text)
    if out.finished:
        sent.num_prompt_tokens = out.num_prompt_tokens
        sent.num_output_tokens = out.num_output_tokens
        sent.num_cached_tokens = out.num_cached_tokens
    body = _chunk_head(reply)
    body["choices"] = [choice]
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(reply: Reply, choices: Sequence[ChoiceStream]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    firsts = choices[:: reply.n]
    body = _chunk_head(reply)
    body["choices"] = []
    body["usage"] = usage(
        sum(c.num_prompt_tokens for c in firsts),
        sum(c.num_output_tokens for c in choices),
        sum(c.num_cached_tokens for c in firsts),
    )
    return body


def _chunk_head(reply: Reply) -> dict[str, Any]:
    return {
        "id": reply.id,
        "object": "chat.completion.chunk" if reply.is_chat else "text_completion",
        "created": reply.created,
        "model": reply.model,
    }


def _engine_finish(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finish_reason is not None else None


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ---- batch output and error files -----------------------------------------------------


def batch_result_line(custom_id: str, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line of a batch's output file: the request succeeded with `body`."""
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def batch_refused_line(
    custom_id: str | None, request_id: str, status_code: int, error: dict[str, Any]
) -> dict[str, Any]:
    """A line of a batch's error file: the request was answered with an error status."""
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": error},
        "error": None,
    }


def batch_unrun_line(
    custom_id: str | None, request_id: str, code: str, message: str, line: int | None = None
) -> dict[str, Any]:
    """A line of a batch's error file: the request never got an answer (expired,
    cancelled, or a line that is not a request at all)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": None,
        "error": error,
    }
