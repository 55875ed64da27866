"""InferenceService: thin adapters from twolane.v1 messages to the engine and back."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import structlog

from twolane.scheduler.request import FinishReason, Priority, RequestOutput
from twolane.services import convert
from twolane.services.errors import (
    NotConfiguredError,
    RequestAbortedError,
    RequestDeadlineError,
    RequestFailedError,
)
from twolane.services.jobs import JobService
from twolane.services.status import grpc_errors
from twolane.services.validation import GenerateMessage, ModelLimits, validate_generate
from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2

if TYPE_CHECKING:
    from twolane.scheduler.async_engine import AsyncEngine

log = structlog.get_logger(__name__)

_NO_DEADLINE_S = 365 * 24 * 3600.0

_NO_JOBS = (
    "the batch lane is not configured on this server: "
    "SubmitJob, GetResult and CancelJob are unavailable"
)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The public API over one engine and, when configured, a job service."""

    def __init__(self, engine: AsyncEngine, jobs: JobService | None = None) -> None:
        self._engine = engine
        self._jobs = jobs
        self._limits = ModelLimits(vocab_size=engine.vocab_size, max_model_len=engine.max_model_len)

    @grpc_errors
    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        arrival_s = time.monotonic()
        request_id, outputs = self._submit(request, context, stream=False)
        updates = [out async for out in outputs]
        return convert.generate_response(request_id, updates, time.monotonic() - arrival_s)

    @grpc_errors
    async def GenerateStream(
        self, request: generate_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        arrival_s = time.monotonic()
        request_id, outputs = self._submit(request, context)
        async for out in outputs:
            yield convert.stream_response(request_id, out, time.monotonic() - arrival_s)

    @grpc_errors
    async def GetStats(
        self, request: inference_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetStatsResponse:
        return convert.stats_response(self._engine.stats())

    @grpc_errors
    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        return await self._require_jobs().submit_job(request)

    @grpc_errors
    async def GetResult(
        self, request: jobs_pb2.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetResultResponse:
        return await self._require_jobs().get_result(request)

    @grpc_errors
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        return await self._require_jobs().cancel_job(request)

    def _require_jobs(self) -> JobService:
        if self._jobs is None:
            raise NotConfiguredError(_NO_JOBS)
        return self._jobs

    def _submit(
        self, request: GenerateMessage, context: grpc.aio.ServicerContext, stream: bool = True
    ) -> tuple[str, AsyncIterator[RequestOutput]]:
        """Validate and enqueue; returns the request id and its updates."""
        valid = validate_generate(request, self._limits, self._engine.tokenizer.encode)
        request_id = uuid.uuid4().hex
        stream = self._engine.add_request(
            request_id,
            prompt_token_ids=valid.prompt_token_ids,
            params=valid.params,
            priority=Priority.INTERACTIVE,
            deadline_s=_deadline_s(context),
            stream=stream,
        )
        # However the RPC ends (finished, cancelled, disconnected, deadline), the
        # engine drops the request and its KV blocks come back. abort is idempotent.
        context.add_done_callback(lambda _: self._engine.abort(request_id))
        return request_id, self._updates(request_id, stream)

    async def _updates(
        self, request_id: str, stream: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        """The engine's updates, with an unsuccessful finish raised as a typed error."""
        log.debug("request started", request_id=request_id)
        try:
            async for out in stream:
                if out.finished:
                    _raise_for_finish(request_id, out)
                    log.info(
                        "request finished",
                        request_id=request_id,
                        finish_reason=out.finish_reason.value if out.finish_reason else None,
                        prompt_tokens=out.num_prompt_tokens,
                        completion_tokens=out.num_output_tokens,
                    )
                yield out
        finally:
            self._engine.abort(request_id)


def _raise_for_finish(request_id: str, out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.DEADLINE:
        raise RequestDeadlineError(f"deadline exceeded (request {request_id})")
    if out.finish_reason is FinishReason.ABORT:
        raise RequestAbortedError(f"request {request_id} was aborted")
    if out.finish_reason is FinishReason.ERROR:
        raise RequestFailedError(f"the engine failed on request {request_id}: {out.error}")


def _deadline_s(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline on the engine's clock (time.monotonic), if it has one."""
    remaining_s = context.time_remaining()
    # Without a deadline gRPC reports None or an effectively infinite time.
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining_s
