"""`twolane gateway`: the public API without a model, in front of `twolane worker`s.

A worker (see supervisor.py) hosts an engine core, consumes jobs from JetStream (many
workers share the consumers) and serves InferenceService on its own port. The gateway
keeps the public API: it forwards Generate and GenerateStream to a worker, sums the
workers' GetStats, and serves SubmitJob, GetResult and CancelJob from JetStream.

Without `--worker`, the workers are the ones announced in the `twolane_workers` bucket
(services/membership.py); the gateway follows their prefix caches
(services/cache_events.py) and sends each call to the worker with the best score of
cached prompt against load (services/routing.py). With `--worker HOST:PORT`
(repeatable) it uses exactly those, in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from nats.aio.client import Client as NATS

from twolane.scheduler.config import option
from twolane.services import gateway_metrics, jobs, options, tracing
from twolane.services.auth import current_principal
from twolane.services.availability import Availability
from twolane.services.cache_events import CacheIndex
from twolane.services.call import REQUEST_ID_KEY, current_request_id
from twolane.services.config import (
    NATS_URL_REQUIRED_HELP,
    NO_EMBEDDED_NATS,
    JobsConfig,
    ListenConfig,
    LogConfig,
    RoutingConfig,
    SecurityConfig,
    WebhookConfig,
)
from twolane.services.errors import NotConfiguredError, UnavailableError
from twolane.services.grpc_server import start_grpc_server
from twolane.services.jobs import JobService
from twolane.services.keys import KeyStore
from twolane.services.loop_lag import watch_loop_lag
from twolane.services.membership import Membership, WorkerRecord
from twolane.services.metrics_http import MetricsServer
from twolane.services.process import run_process, stop_event
from twolane.services.prompt_tokens import GatewayTokenizers
from twolane.services.routing import Route, Router
from twolane.services.status import grpc_errors
from twolane.services.validation import GenerateMessage
from twolane.services.workers import Worker, WorkerPool
from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2

log = structlog.get_logger(__name__)

_NO_DEADLINE_S = 365 * 24 * 3600.0
_NEEDS_NATS = "needs --nats-url (env TWOLANE_NATS_URL): the gateway and its workers share one NATS"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway = subparsers.add_parser(
        "gateway",
        help="serve the public API; forward generation to workers, jobs to NATS",
        description="The public gRPC API without a model: interactive calls go to workers "
        "(found through NATS unless --worker is given), jobs to JetStream (on the NATS "
        "given by --nats-url; the gateway starts none).",
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
        "a worker's HOST:PORT, repeatable; used in turn, skipping unreachable ones, "
        "instead of the workers announced through NATS (env: comma separated)",
        flag="worker",
        env="TWOLANE_WORKERS",
    )
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics_port: int = option(
        -1, "Prometheus metrics over HTTP on this port; -1 off, 0 a free port (logged)"
    )

    def __post_init__(self) -> None:
        if not self.jobs.nats_url:
            raise ValueError(_NEEDS_NATS)
        for worker in self.workers:
            if ":" not in worker:
                raise ValueError(f"--worker takes HOST:PORT, got {worker!r}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be -1 (off) or a port, got {self.metrics_port}")

    @property
    def discovers_workers(self) -> bool:
        return not self.workers


def gateway_main(args: argparse.Namespace) -> int:
    return run_process("gateway", args, lambda a: options.from_args(GatewayConfig, a), run_gateway)


async def run_gateway(config: GatewayConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and stop."""
    stop = stop_event()
    async with contextlib.AsyncExitStack() as stack:
        nats_availability = Availability()
        nc, store = await jobs.start_job_store(
            stack,
            config.jobs,
            jobs.shape_validator,
            name="twolane-gateway",
            stop=stop,
            availability=nats_availability,
            webhooks=config.webhooks,
        )
        pool = WorkerPool.static(config.workers)
        stack.push_async_callback(pool.close)
        if config.discovers_workers:
            index, tokenizers = await _follow_workers(
                stack, nc, nats_availability, pool, config.jobs.nats_replicas
            )
            servicer = GatewayServicer(
                pool, store, Router(config.routing), index, tokenizers, discovered=True
            )
        else:
            gateway_metrics.count_workers([None] * len(config.workers))
            for address in config.workers:
                gateway_metrics.know_worker(address)
            servicer = GatewayServicer(pool, store, Router(config.routing))
        if config.metrics_port >= 0:
            _serve_metrics(
                stack, config, lambda: nats_availability.available and bool(pool.routable())
            )
        stack.enter_context(watch_loop_lag("gateway", ""))
        security = config.security
        keys = KeyStore(Path(security.api_keys)) if security.auth_on else None
        await start_grpc_server(
            stack,
            servicer,
            config.listen,
            security=security,
            keys=keys,
            jobs_availability=nats_availability,
            workers=list(config.workers) or "discovered through NATS",
            route_policy=config.routing.policy if config.discovers_workers else "round-robin",
        )
        await stop.wait()
        log.info("draining", grace_period_s=config.listen.grace_period_s)
    log.info("stopped")


async def _follow_workers(
    stack: contextlib.AsyncExitStack,
    nc: NATS,
    availability: Availability,
    pool: WorkerPool,
    num_replicas: int,
) -> tuple[CacheIndex, GatewayTokenizers]:
    """Keep `pool` to the announced workers, with their caches and tokenizers."""
    index = CacheIndex(nc)
    await index.start()
    stack.push_async_callback(index.close)
    tokenizers = GatewayTokenizers(nc.jetstream())
    stack.callback(tokenizers.close)

    def on_change(key: str, record: WorkerRecord | None) -> None:
        known = pool.workers.get(key)
        pool.update(key, record)
        index.track(key, record)
        if record is not None:
            gateway_metrics.know_worker(record.address)
            tokenizers.want(record.tokenizer)
            held = index.index(key)
            gateway_metrics.count_cached_blocks(
                record.address, len(held) if held is not None else 0
            )
        elif known is not None:
            gateway_metrics.count_cached_blocks(known.address, None)
        gateway_metrics.count_workers([w.record for w in pool.all()])

    membership = Membership(nc, availability, on_change, num_replicas)
    await membership.start()
    stack.push_async_callback(membership.close)
    return index, tokenizers


def _serve_metrics(
    stack: contextlib.AsyncExitStack, config: GatewayConfig, ready: Callable[[], bool]
) -> None:
    from prometheus_client import REGISTRY

    metrics = MetricsServer(config.listen.host, config.metrics_port, REGISTRY, ready)
    metrics.start()
    stack.callback(metrics.stop)
    log.info(
        "metrics",
        url=f"http://{config.listen.host}:{metrics.port}/metrics",
        metrics_port=metrics.port,
    )


class GatewayServicer(inference_pb2_grpc.InferenceServiceServicer):
    """InferenceService without a model: generation on workers, jobs on JetStream.

    A call goes to the workers in the order routing gives. One that cannot be reached
    (UNAVAILABLE: down, restarting or draining) is skipped: the call moves on to the
    next worker, as long as nothing has reached the client yet, and workers whose
    connection is failing are tried last until they come back.
    """

    def __init__(
        self,
        pool: WorkerPool,
        jobs: JobService,
        router: Router,
        index: CacheIndex | None = None,
        tokenizers: GatewayTokenizers | None = None,
        discovered: bool = False,
    ) -> None:
        self._pool = pool
        self._jobs = jobs
        self._router = router
        self._index = index
        self._tokenizers = tokenizers
        self._discovered = discovered

    def _route(self, request: GenerateMessage) -> tuple[list[Worker], Route]:
        """The workers to try for one call, best first, failing connections last."""
        workers = self._pool.routable()
        if not workers:
            if not self._discovered:
                raise NotConfiguredError(
                    "this gateway has no workers for generation: start it with "
                    "--worker HOST:PORT, or without it to use the workers announced "
                    "through NATS"
                )
            raise UnavailableError("no worker is serving; try again shortly")
        by_key = {w.key: w for w in workers}
        index = self._index
        candidates = [
            w.candidate(index.index(w.key) if index is not None else None) for w in workers
        ]
        tokenizers = self._tokenizers
        prompt = (
            (lambda digest: tokenizers.prompt_token_ids(request, digest))
            if tokenizers is not None
            else None
        )
        route = self._router.route(candidates, prompt)
        order = [by_key[c.key] for c in route.order]
        return sorted(order, key=lambda w: w.is_failing), route

    def _skip(self, err: grpc.aio.AioRpcError, worker: Worker, is_last: bool) -> bool:
        """Whether to try the next worker after `err` (nothing reached the client yet)."""
        if is_last or err.code() is not grpc.StatusCode.UNAVAILABLE:
            return False
        log.warning("worker unavailable", worker=worker.address, error=err.details())
        gateway_metrics.FAILOVERS.labels(worker.address).inc()
        return True

    @grpc_errors
    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generate_pb2.GenerateResponse:
        order, route = self._route(request)
        for n, worker in enumerate(order):
            try:
                with self._pool.calling(worker):
                    response = await worker.stub.Generate(
                        request, timeout=_timeout_s(context), metadata=_forwarded(context)
                    )
            except grpc.aio.AioRpcError as err:
                if not self._skip(err, worker, n == len(order) - 1):
                    await _relay(context, err)
                    raise
                continue
            gateway_metrics.observe_answer(
                worker.address, response.usage, _predicted(route, worker)
            )
            return response
        raise AssertionError("unreachable: the last worker's error is relayed")

    @grpc_errors
    async def GenerateStream(
        self,
        request: generate_pb2.GenerateStreamRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        order, route = self._route(request)
        for n, worker in enumerate(order):
            with self._pool.calling(worker):
                call = worker.stub.GenerateStream(
                    request, timeout=_timeout_s(context), metadata=_forwarded(context)
                )
                relayed_any = False
                try:
                    async for chunk in call:
                        relayed_any = True
                        if chunk.HasField("usage"):
                            gateway_metrics.observe_answer(
                                worker.address, chunk.usage, _predicted(route, worker)
                            )
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
        self, request: inference_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GetStatsResponse:
        """Every reachable worker's counters, summed; the prefix cache hit rate is their
        mean (the workers do not report how many tokens each rate covers)."""
        workers = self._pool.all()
        if not workers:
            if not self._discovered:
                raise NotConfiguredError("this gateway has no workers")
            raise UnavailableError("no worker is known yet")
        replies = await asyncio.gather(
            *(
                w.stub.GetStats(request, timeout=_timeout_s(context), metadata=_forwarded(context))
                for w in workers
            ),
            return_exceptions=True,
        )
        stats = [r for r in replies if isinstance(r, inference_pb2.GetStatsResponse)]
        if not stats:
            for error in (r for r in replies if isinstance(r, BaseException)):
                if isinstance(error, grpc.aio.AioRpcError):
                    await _relay(context, error)
                raise error
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
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.SubmitJobResponse:
        return await self._jobs.submit_job(request, current_principal().tenant)

    @grpc_errors
    async def GetResult(
        self, request: jobs_pb2.GetResultRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.GetResultResponse:
        return await self._jobs.get_result(request, current_principal().tenant)

    @grpc_errors
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.CancelJobResponse:
        return await self._jobs.cancel_job(request, current_principal().tenant)


async def _relay(context: grpc.aio.ServicerContext[Any, Any], err: grpc.aio.AioRpcError) -> None:
    """The worker's status, message and error details, unchanged, to the client."""
    trailers = tuple(
        (key, value)
        for key, value in (err.trailing_metadata() or ())
        if key == "grpc-status-details-bin"
    )
    await context.abort(err.code(), err.details() or "", trailers)


def _predicted(route: Route, worker: Worker) -> int:
    """The cached tokens routing expected of `worker` (only its first choice has a guess)."""
    return (
        route.num_predicted_cached_tokens if route.order and route.order[0].key == worker.key else 0
    )


def _forwarded(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str], ...]:
    """What the worker gets of the call: the caller's key (it checks the same keys), the
    request id, and the trace context with the gateway's span as the parent."""
    key = tuple(
        (k, v)
        for k, v in context.invocation_metadata() or ()
        if k == "authorization" and isinstance(v, str)
    )
    return (*key, (REQUEST_ID_KEY, current_request_id()), *tracing.inject().items())


def _timeout_s(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining_s = context.time_remaining()
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    return remaining_s
