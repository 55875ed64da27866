"""`twolane frontend`: the public gRPC API over one engine core, in a process of its own.

The servicer is a thin adapter: it validates once (tokenizing the prompt), hands the
token ids to the engine core, turns the token ids that come back into text, and
streams. The process imports no torch; `twolane serve` runs one or more of these
(`--api-server-count`) beside the engine core and the job runner.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import structlog

from twolane.scheduler.client import EngineClient
from twolane.scheduler.protocol import EngineAddress
from twolane.scheduler.request import Priority
from twolane.services import convert, jobs, options
from twolane.services.config import FrontendProcessConfig
from twolane.services.errors import NotConfiguredError
from twolane.services.generation import RequestOutput, generate
from twolane.services.grpc_server import start_grpc_server
from twolane.services.jobs import JobService
from twolane.services.loop_lag import watch_loop_lag
from twolane.services.process import run_process, settle_heap, signal_ready, stop_event
from twolane.services.prompts import ModelPrompts
from twolane.services.status import grpc_errors
from twolane.services.validation import (
    GenerateMessage,
    ModelLimits,
    validate_generate,
)
from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2

log = structlog.get_logger(__name__)

_NO_DEADLINE_S = 365 * 24 * 3600.0

_NO_JOBS = (
    "the batch lane is not configured on this server: "
    "SubmitJob, GetResult and CancelJob are unavailable"
)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The public API over one engine core and, when configured, a job service."""

    def __init__(
        self, engine: EngineClient, prompts: ModelPrompts, jobs: JobService | None = None
    ) -> None:
        assert engine.info is not None, "the engine client must be ready"
        self._engine = engine
        self._prompts = prompts
        self._jobs = jobs
        self._limits = ModelLimits(
            vocab_size=engine.info.vocab_size, max_model_len=engine.info.max_model_len
        )

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
        response = convert.stats_response(await self._engine.stats())
        response.model = self._engine.info.model if self._engine.info else ""
        return response

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
        valid = validate_generate(request, self._limits, self._prompts)
        request_id = uuid.uuid4().hex
        outputs = generate(
            self._engine,
            self._prompts.tokenizer,
            request_id,
            valid,
            Priority.INTERACTIVE,
            _deadline_s(context),
            stream=stream,
        )
        return request_id, self._logged(request_id, outputs)

    async def _logged(
        self, request_id: str, outputs: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        async for out in outputs:
            if out.finished:
                log.info(
                    "request finished",
                    request_id=request_id,
                    finish_reason=out.finish_reason.value if out.finish_reason else None,
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=out.num_output_tokens,
                )
            yield out


def _deadline_s(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline on the engine's clock (time.monotonic), if it has one."""
    remaining_s = context.time_remaining()
    # Without a deadline gRPC reports None or an effectively infinite time.
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining_s


# ---- the process ------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "frontend",
        help="(started by serve) the gRPC API over a running engine core",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    options.add_options(parser, FrontendProcessConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return run_process(
        "frontend", args, lambda a: options.from_args(FrontendProcessConfig, a), run_frontend
    )


async def run_frontend(config: FrontendProcessConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and stop."""
    stop = stop_event()
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(watch_loop_lag("frontend"))
        engine = EngineClient(EngineAddress(Path(config.child.ipc_dir)), name="frontend")
        await engine.start()
        stack.push_async_callback(engine.close)
        info = await engine.wait_ready_unless(stop)
        if info is None:
            return
        prompts = ModelPrompts.from_dir(Path(info.model_dir))
        limits = ModelLimits(vocab_size=info.vocab_size, max_model_len=info.max_model_len)
        _, store = await jobs.start_job_store(
            stack, config.jobs, jobs.model_validator(limits, prompts), name="twolane-frontend"
        )
        servicer = InferenceServicer(engine, prompts, store)
        server = await start_grpc_server(
            stack,
            servicer,
            config.listen,
            reuse_port=config.reuse_port,
            engine=engine,
        )
        settle_heap()
        signal_ready(config.child.ready_fd)
        await stop.wait()
        log.info("draining", grace_period_s=config.listen.grace_period_s, port=server.port)
    log.info("stopped")
