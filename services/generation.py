"""One request through the engine core, as the frontends and the job runner see it:
validated token ids in, text and token deltas out, stop strings applied.

An unsuccessful end (deadline, abort, an engine fault, the core gone) is raised as the
typed error the status mapping turns into a precise gRPC code.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from twolane.models.tokenizer import Tokenizer
from twolane.scheduler.client import EngineClient
from twolane.scheduler.errors import QueueFullError
from twolane.scheduler.protocol import TokenOutput
from twolane.scheduler.request import ErrorCode, FinishReason, Priority
from twolane.services import tracing
from twolane.services.errors import (
    RequestAbortedError,
    RequestDeadlineError,
    RequestFailedError,
    UnavailableError,
)
from twolane.services.text import TextAssembler
from twolane.services.validation import ValidRequest

log = structlog.get_logger(__name__)


@dataclass
class RequestOutput:
    """One update of a request: what it adds, and on the last one how it ended."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time_s: float = 0.0
    ttft_s: float | None = None


async def generate(
    engine: EngineClient,
    tokenizer: Tokenizer,
    request_id: str,
    valid: ValidRequest,
    priority: Priority,
    deadline_s: float | None,
    stream: bool = True,
    tenant: str = "default",
) -> AsyncIterator[RequestOutput]:
    """Run `valid` on the engine and yield its updates; the last one has `finished`.

    With `stream` False the engine sends only the final output (unless stop strings need
    the text as it grows). However the caller stops iterating, the request is aborted in
    the engine, so its KV blocks come back.

    Raises:
        QueueFullError, RequestDeadlineError, RequestAbortedError, RequestFailedError,
        UnavailableError: the request did not finish normally.
    """
    params = valid.params
    engine_stream = engine.add_request(
        request_id,
        valid.prompt_token_ids,
        params,
        priority=priority,
        deadline_s=deadline_s,
        stream=stream or bool(params.stop),
        tenant=tenant,
    )
    text = TextAssembler(tokenizer, valid.prompt_token_ids, params.stop)
    num_output_tokens = 0
    async with engine_stream:
        async for out in engine_stream:
            if out.finish_reason is not None and out.finish_reason not in _SUCCESS:
                _raise_for_finish(request_id, out)
            delta = text.add(out.new_token_ids)
            new_tokens = out.new_token_ids[: delta.num_tokens]
            num_output_tokens += len(new_tokens)
            finished = delta.stopped or out.finished
            update = RequestOutput(
                request_id=request_id,
                new_token_ids=new_tokens,
                new_text=delta.text + (text.finish() if finished else ""),
                new_logprobs=out.new_logprobs[: delta.num_tokens],
                finished=finished,
                finish_reason=FinishReason.STOP if delta.stopped else out.finish_reason,
                num_prompt_tokens=out.num_prompt_tokens,
                num_output_tokens=num_output_tokens,
                num_cached_tokens=out.num_cached_tokens,
                queue_time_s=out.queue_time_s,
                ttft_s=out.ttft_s,
            )
            if finished or update.new_token_ids or update.new_text:
                yield update
            if finished:
                # A stop string ends the request here; leaving the stream aborts it.
                return


_SUCCESS = (FinishReason.STOP, FinishReason.LENGTH)


def _raise_for_finish(request_id: str, out: TokenOutput) -> None:
    if out.finish_reason is FinishReason.DEADLINE:
        raise RequestDeadlineError(f"deadline exceeded (request {request_id})")
    if out.finish_reason is FinishReason.ABORT:
        raise RequestAbortedError(f"request {request_id} was aborted")
    code = out.error_code
    if code is ErrorCode.QUEUE_FULL:
        raise QueueFullError(out.error or "the interactive queue is full; retry later")
    if code in (ErrorCode.ENGINE_DEAD, ErrorCode.ENGINE_STOPPING):
        raise UnavailableError(f"the engine is unavailable: {out.error}")
    raise RequestFailedError(f"the engine failed on request {request_id}: {out.error}")


def trace_phases(final: RequestOutput, arrival_s: float) -> None:
    """A finished request's time in the engine as child spans of the current one: waiting
    for a step, prefill (to the first token) and decode, from the times the core reported."""
    now_s = time.monotonic()
    scheduled_s = arrival_s + final.queue_time_s
    first_token_s = arrival_s + (final.ttft_s if final.ttft_s is not None else now_s - arrival_s)
    tracing.past_span("queue", arrival_s, scheduled_s)
    tracing.past_span(
        "prefill",
        scheduled_s,
        first_token_s,
        prompt_tokens=final.num_prompt_tokens,
        cached_tokens=final.num_cached_tokens,
    )
    tracing.past_span("decode", first_token_s, now_s, completion_tokens=final.num_output_tokens)
