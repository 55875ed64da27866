"""`twolane gateway`: the public API without a model, in front of `twolane worker`s.

A worker (see supervisor.py) hosts an engine core, consumes jobs from JetStream (many
workers share the consumers) and serves InferenceService on its own port. The gateway
keeps the public API: it forwards Generate and GenerateStream to its workers in turn,
skipping unreachable ones (`--worker HOST:PORT`, repeatable), sums their GetStats, and
serves SubmitJob, GetResult and CancelJob from JetStream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from twolane.scheduler.config import option
from twolane.services import jobs, options, tracing
from twolane.services.auth import current_principal
from twolane.services.availability import Availability
from twolane.services.call import REQUEST_ID_KEY, current_request_id
from twolane.services.config import (
    NATS_URL_REQUIRED_HELP,
    NO_EMBEDDED_NATS,
    JobsConfig,
    ListenConfig,
    LogConfig,
    SecurityConfig,
)
from twolane.services.errors import NotConfiguredError, UnavailableError
from twolane.services.grpc_server import start_grpc_server
from twolane.services.jobs import JobService
from twolane.services.keys import KeyStore
from twolane.services.process import run_process, stop_event
from twolane.services.status import grpc_errors
from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2

log = structlog.get_logger(__name__)

_NO_DEADLINE_S = 365 * 24 * 3600.0
_NEEDS_NATS = "needs --nats-url (env TWOLANE_NATS_URL): the gateway and its workers share one NATS"


def register(subparsers: argparse._SubParsersAction) -> None:
    gateway = subparsers.add_parser(
        "gateway",
        help="serve the public API; forward generation to workers, jobs to NATS",
        description="The public gRPC API without a model: interactive calls go to workers, "
        "jobs to JetStream (on the NATS given by --nats-url; the gateway starts none).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    options.add_options(
        gateway, GatewayConfig, skip=NO_EMBEDDED_NATS, helps={"nats_url": NATS_URL_REQUIRED_HELP}
    )
    gateway.set_defaults(func=gateway_main)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `twolane gateway` needs; `jobs.nats_url` is required."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    workers: tuple[str, ...] = option(
        (),
        "a worker's HOST:PORT, repeatable; used in turn, skipping unreachable ones "
        "(env: comma separated)",
        flag="worker",
        env="TWOLANE_WORKERS",
    )
    jobs: JobsConfig = field(default_factory=JobsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if not self.jobs.nats_url:
            raise ValueError(_NEEDS_NATS)
        for worker in self.workers:
            if ":" not in worker:
                raise ValueError(f"--worker takes HOST:PORT, got {worker!r}")


def gateway_main(args: argparse.Namespace) -> int:
    return run_process("gateway", args, lambda a: options.from_args(GatewayConfig, a), run_gateway)


async def run_gateway(config: GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and stop."""
    stop = stop_event()
    async with contextlib.AsyncExitStack() as stack:
        nats_availability = Availability()
        _, store = await jobs.start_job_store(
            stack,
            config.jobs,
            jobs.shape_validator,
            name="twolane-gateway",
            stop=stop,
            availability=nats_availability,
        )
        servicer = GatewayServicer(config.workers, store)
        stack.push_async_callback(servicer.close)
        security = config.security
        keys = KeyStore(Path(security.api_keys)) if security.auth_on else None
        await start_grpc_server(
            stack,
            servicer,
            config.listen,
            security=security,
            keys=keys,
            jobs_availability=nats_availability,
            workers=list(config.workers),
        )
        await stop.wait()
        log.info("draining", grace_period_s=config.listen.grace_period_s)
    log.info("stopped")


class GatewayServicer(inference_pb2_grpc.InferenceServiceServicer):
    """InferenceService without a model: generation on workers, jobs on JetStream.

    Calls go to the workers in turn. One that cannot be reached (UNAVAILABLE: down,
    restarting or draining) is skipped: the call moves on to the next worker, as long
    as nothing has reached the client yet, and workers whose connection is failing
    are tried last until they come back.
    """

    def __init__(self, workers: tuple[str, ...], jobs: JobService) -> None:
        self._workers = workers
        self._channels = [grpc.aio.insecure_channel(worker) for worker in workers]
        self._stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in self._channels]
        self._turn = itertools.count()
        self._jobs = jobs

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    def _require_workers(self) -> None:
        if not self._stubs:
            raise NotConfiguredError(
                "this gateway has no workers for generation: start it with --worker HOST:PORT"
            )

    def _order(self) -> list[int]:
        """The workers to try for one call: the next in turn first, failing ones last."""
        self._require_workers()
        start = next(self._turn)
        order = [(start + i) % len(self._stubs) for i in range(len(self._stubs))]
        failing = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        return sorted(order, key=lambda i: self._channels[i].get_state(True) == failing)

    def _skip(self, err: grpc.aio.AioRpcError, worker: int, is_last: bool) -> bool:
        """Whether to try the next worker after `err` (nothing reached the client yet)."""
        if is_last or err.code() is not grpc.StatusCode.UNAVAILABLE:
            return False
        log.warning("worker unavailable", worker=self._workers[worker], error=err.details())
        return True

    @grpc_errors
    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        order = self._order()
        for n, worker in enumerate(order):
            try:
                return await self._stubs[worker].Generate(
                    request, timeout=_timeout_s(context), metadata=_forwarded(context)
                )
            except grpc.aio.AioRpcError as err:
                if not self._skip(err, worker, n == len(order) - 1):
                    await _relay(context, err)
                    raise
        raise AssertionError("unreachable: the last worker's error is relayed")

    @grpc_errors
    async def GenerateStream(
        self, request: generate_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        order = self._order()
        for n, worker in enumerate(order):
            call = self._stubs[worker].GenerateStream(
                request, timeout=_timeout_s(context), metadata=_forwarded(context)
            )
            relayed_any = False
            try:
                async for chunk in call:
                    relayed_any = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as err:
                if relayed_any or not self._skip(err, worker, n == len(order) - 1):
                    await _relay(context, err)
                    return
            finally:
                # A client that left early stops the worker's request too.
                call.cancel()

    @grpc_errors
    async def GetStats(
        self, request: inference_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetStatsResponse:
        """Every reachable worker's counters, summed; the prefix cache hit rate is their
        mean (the workers do not report how many tokens each rate covers)."""
        self._require_workers()
        replies = await asyncio.gather(
            *(
                stub.GetStats(request, timeout=_timeout_s(context), metadata=_forwarded(context))
                for stub in self._stubs
            ),
            return_exceptions=True,
        )
        stats = [r for r in replies if isinstance(r, inference_pb2.GetStatsResponse)]
        if not stats:
            for reply in replies:
                if isinstance(reply, grpc.aio.AioRpcError):
                    await _relay(context, reply)
                raise reply
        total = inference_pb2.GetStatsResponse(model_name=stats[0].model_name)
        summed = (
            "num_running",
            "num_waiting",
            "num_free_blocks",
            "num_used_blocks",
            "num_total_blocks",
            "num_preemptions",
            "num_running_interactive",
            "num_waiting_interactive",
            "num_running_batch",
            "num_waiting_batch",
            "num_steps",
        )
        for worker in stats:
            for name in summed:
                setattr(total, name, getattr(total, name) + getattr(worker, name))
        total.prefix_cache_hit_rate = sum(w.prefix_cache_hit_rate for w in stats) / len(stats)
        total.num_workers = len(stats)
        # The backlog is the shared queue's: the gateway reads it itself.
        with contextlib.suppress(UnavailableError):
            await self._jobs.fill_backlog(total)
        return total

    @grpc_errors
    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        return await self._jobs.submit_job(request, current_principal().tenant)

    @grpc_errors
    async def GetResult(
        self, request: jobs_pb2.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetResultResponse:
        return await self._jobs.get_result(request, current_principal().tenant)

    @grpc_errors
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        return await self._jobs.cancel_job(request, current_principal().tenant)


async def _relay(context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError) -> None:
    """The worker's status, message and error details, unchanged, to the client."""
    trailers = tuple(
        (key, value)
        for key, value in (err.trailing_metadata() or ())
        if key == "grpc-status-details-bin"
    )
    await context.abort(err.code(), err.details() or "", trailers)


def _forwarded(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """What the worker gets of the call: the caller's key (it checks the same keys), the
    request id, and the trace context with the gateway's span as the parent."""
    key = tuple(
        (k, v)
        for k, v in context.invocation_metadata() or ()
        if k == "authorization" and isinstance(v, str)
    )
    return (*key, (REQUEST_ID_KEY, current_request_id()), *tracing.inject().items())


def _timeout_s(context: grpc.aio.ServicerContext) -> float | None:
    remaining_s = context.time_remaining()
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    return remaining_s
