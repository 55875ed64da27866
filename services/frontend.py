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
from typing import Any

import grpc
import structlog

from twolane.scheduler.client import EngineClient
from twolane.scheduler.config import served_model_name
from twolane.scheduler.protocol import EngineAddress
from twolane.scheduler.request import Priority
from twolane.services import convert, jobs, options, tracing
from twolane.services.audit import AuditLog
from twolane.services.auth import current_principal
from twolane.services.availability import Availability
from twolane.services.call import current_request_id
from twolane.services.config import FrontendProcessConfig
from twolane.services.errors import NotConfiguredError, UnavailableError
from twolane.services.generation import RequestOutput, generate, trace_phases
from twolane.services.grpc_server import start_grpc_server
from twolane.services.jobs import JobService
from twolane.services.keys import KeyStore, Principal
from twolane.services.loop_lag import watch_loop_lag
from twolane.services.process import run_process, settle_heap, signal_ready, stop_event
from twolane.services.prompts import ModelPrompts
from twolane.services.quotas import Reservation, TenantQuotas
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
    """The public API over one engine core and, when configured, a job service.

    The caller is `current_principal()` (the default tenant when auth is off): its tenant
    scopes jobs, and its limits are enforced by `quotas`; every job operation goes to the
    audit log when there is one.
    """

    def __init__(
        self,
        engine: EngineClient,
        prompts: ModelPrompts,
        jobs: JobService | None = None,
        quotas: TenantQuotas | None = None,
        audit: AuditLog | None = None,
        log_prompts: bool = False,
    ) -> None:
        assert engine.info is not None, "the engine client must be ready"
        self._engine = engine
        self._prompts = prompts
        self._jobs = jobs
        self._quotas = quotas or TenantQuotas()
        self._audit = audit
        self._log_prompts = log_prompts
        self._limits = ModelLimits(
            vocab_size=engine.info.vocab_size, max_model_len=engine.info.max_model_len
        )

    @grpc_errors
    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generate_pb2.GenerateResponse:
        arrival_s = time.monotonic()
        request_id, outputs = self._submit(request, context, stream=False)
        updates = [out async for out in outputs]
        return convert.generate_response(request_id, updates, time.monotonic() - arrival_s)

    @grpc_errors
    async def GenerateStream(
        self,
        request: generate_pb2.GenerateStreamRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        arrival_s = time.monotonic()
        request_id, outputs = self._submit(request, context)
        async for out in outputs:
            yield convert.stream_response(request_id, out, time.monotonic() - arrival_s)

    @grpc_errors
    async def GetStats(
        self, request: inference_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GetStatsResponse:
        assert self._engine.info is not None
        reply = convert.stats_response(
            await self._engine.stats(), served_model_name(self._engine.info.model)
        )
        if self._jobs is not None:
            with contextlib.suppress(UnavailableError):  # the engine's figures still count
                await self._jobs.fill_backlog(reply)
        return reply

    @grpc_errors
    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.SubmitJobResponse:
        principal = current_principal()
        jobs = self._require_jobs()
        try:
            params = request.request.params
            max_tokens = params.max_tokens if params.HasField("max_tokens") else 16
            num_tokens = len(request.request.prompt_token_ids) or len(request.request.prompt)
            # A job's tokens are counted when it is submitted: it runs in another process.
            self._quotas.admit(principal, num_tokens + max_tokens, concurrent=False)
            reply = await jobs.submit_job(request, principal.tenant)
        except Exception as exc:
            self._record("submit", principal, "", exc)
            raise
        self._record("submit", principal, reply.job_id, None)
        return reply

    @grpc_errors
    async def GetResult(
        self, request: jobs_pb2.GetResultRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.GetResultResponse:
        principal = current_principal()
        try:
            reply = await self._require_jobs().get_result(request, principal.tenant)
        except Exception as exc:
            self._record("result", principal, request.job_id, exc)
            raise
        self._record("result", principal, request.job_id, None)
        return reply

    @grpc_errors
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.CancelJobResponse:
        principal = current_principal()
        try:
            reply = await self._require_jobs().cancel_job(request, principal.tenant)
        except Exception as exc:
            self._record("cancel", principal, request.job_id, exc)
            raise
        self._record("cancel", principal, request.job_id, None)
        return reply

    def _record(
        self, operation: str, principal: Principal, job_id: str, error: Exception | None
    ) -> None:
        if self._audit is not None:
            outcome = "ok" if error is None else type(error).__name__
            self._audit.record(operation, principal, job_id, outcome)

    def _require_jobs(self) -> JobService:
        if self._jobs is None:
            raise NotConfiguredError(_NO_JOBS)
        return self._jobs

    def _submit(
        self,
        request: GenerateMessage,
        context: grpc.aio.ServicerContext[Any, Any],
        stream: bool = True,
    ) -> tuple[str, AsyncIterator[RequestOutput]]:
        """Validate, count against the tenant's quotas and enqueue; returns the request id
        and its updates."""
        principal = current_principal()
        with tracing.tracer.start_as_current_span("validate"):
            valid = validate_generate(request, self._limits, self._prompts)
        reservation = self._quotas.admit(
            principal, len(valid.prompt_token_ids) + valid.params.max_tokens
        )
        # The caller's id (x-request-id) names the request to the caller and in logs; the
        # engine gets an id of its own, since two callers may send the same one.
        request_id = current_request_id()
        outputs = generate(
            self._engine,
            self._prompts.tokenizer,
            uuid.uuid4().hex,
            valid,
            Priority.INTERACTIVE,
            _deadline_s(context),
            stream=stream,
            tenant=principal.tenant,
        )
        return request_id, self._accounted(request_id, request, outputs, reservation)

    async def _accounted(
        self,
        request_id: str,
        request: GenerateMessage,
        outputs: AsyncIterator[RequestOutput],
        reservation: Reservation,
    ) -> AsyncIterator[RequestOutput]:
        """The updates, with the tokens the request used settled, the phases traced and the
        end logged."""
        used = 0
        text: list[str] = []
        arrival_s = time.monotonic()
        try:
            async for out in outputs:
                reservation.started()
                used = out.num_prompt_tokens + out.num_output_tokens
                if self._log_prompts:
                    text.append(out.new_text)
                if out.finished:
                    trace_phases(out, arrival_s)
                    fields = {"prompt": request.prompt, "output": "".join(text)}
                    log.info(
                        "request finished",
                        request_id=request_id,
                        finish_reason=out.finish_reason.value if out.finish_reason else None,
                        prompt_tokens=out.num_prompt_tokens,
                        completion_tokens=out.num_output_tokens,
                        **(fields if self._log_prompts else {}),
                    )
                yield out
        finally:
            reservation.settle(used)


def _deadline_s(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The RPC's deadline on the engine's clock (time.monotonic), if it has one."""
    remaining_s = context.time_remaining()
    # Without a deadline gRPC reports None or an effectively infinite time.
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    return time.monotonic() + remaining_s


# ---- the process ------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    security = config.security
    keys = KeyStore(Path(security.api_keys)) if security.auth_on else None
    async with contextlib.AsyncExitStack() as stack:
        engine = EngineClient(EngineAddress(Path(config.child.ipc_dir)), name="frontend")
        await engine.start()
        stack.push_async_callback(engine.close)
        info = await engine.wait_ready_unless(stop)
        if info is None:
            return
        stack.enter_context(watch_loop_lag("frontend", served_model_name(info.model)))
        prompts = ModelPrompts.from_dir(Path(info.model_dir))
        limits = ModelLimits(vocab_size=info.vocab_size, max_model_len=info.max_model_len)
        nats_availability = Availability()
        _, store = await jobs.start_job_store(
            stack,
            config.jobs,
            jobs.model_validator(limits, prompts),
            name="twolane-frontend",
            stop=stop,
            availability=nats_availability,
            tenant_max_queued=config.jobs.tenant_max_queued_jobs if keys else None,
            webhooks=config.webhooks,
        )
        audit = AuditLog(security.audit_path(config.jobs.data_dir))
        stack.callback(audit.close)
        quotas = TenantQuotas(config.quota_share, held_by_core=engine.held_for_tenant)
        servicer = InferenceServicer(engine, prompts, store, quotas, audit, security.log_prompts)
        server = await start_grpc_server(
            stack,
            servicer,
            config.listen,
            security=security,
            keys=keys,
            reuse_port=config.reuse_port,
            engine=engine,
            jobs_availability=nats_availability,
        )
        settle_heap()
        signal_ready(config.child.ready_fd)
        await stop.wait()
        log.info("draining", grace_period_s=config.listen.grace_period_s, port=server.port)
    log.info("stopped")
