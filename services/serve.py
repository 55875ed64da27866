"""`twolane serve`: the engine and the gRPC API in one process.

Components start in an AsyncExitStack and stop in reverse order, so a later
component (an embedded nats-server, the job worker) is added with one more
`start_*` step and is torn down before the engine it depends on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import TYPE_CHECKING

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from twolane.services.config import ServeConfig
from twolane.services.gateway import InferenceServicer
from twolane.services.jobs import JobService
from twolane.services.process import keep_freed_memory, run_process, stop_event
from twolane.v1 import inference_pb2, inference_pb2_grpc

if TYPE_CHECKING:
    from twolane.scheduler.async_engine import AsyncEngine

log = structlog.get_logger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the gRPC API on one engine", description=__doc__.splitlines()[0]
    )
    ServeConfig.add_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return run_process("serve", args, ServeConfig.from_args, serve)


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight requests and stop."""
    stop = stop_event()
    async with contextlib.AsyncExitStack() as stack:
        # NATS first: a data dir another server holds is refused before the model loads,
        # and NATS outlives everything that uses it on the way down.
        config = await start_nats(stack, config)
        engine = await start_engine(stack, config)
        start_metrics(stack, config, engine)
        jobs = await start_jobs(stack, config, engine)
        servicer = InferenceServicer(engine, jobs)
        await start_grpc_server(stack, servicer, config.host, config.port, config.grace_period_s)
        await stop.wait()
        log.info("draining", grace_period_s=config.grace_period_s)
    log.info("stopped")


async def start_nats(stack: contextlib.AsyncExitStack, config: ServeConfig) -> ServeConfig:
    """Start the embedded nats-server unless --nats-url names one; return the config with
    the URL to use."""
    from twolane.services import jobs

    url = await jobs.start_nats(stack, config.jobs)
    return dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, nats_url=url))


async def start_engine(stack: contextlib.AsyncExitStack, config: ServeConfig) -> AsyncEngine:
    import torch  # imported here so that light CLI commands never load torch

    from twolane.scheduler.async_engine import AsyncEngine

    if config.threads:
        # Fewer intra-op threads than cores when other busy processes share the machine:
        # a parallel op whose thread has to share a core stalls for milliseconds.
        torch.set_num_threads(config.threads)
    keep_freed_memory()
    log.info("loading model", model=config.model, device=config.device, dtype=config.dtype)
    engine = AsyncEngine(config.engine_config())
    await engine.start()
    stack.push_async_callback(engine.shutdown)
    stats = engine.stats()
    log.info(
        "engine started",
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        num_total_blocks=stats.num_total_blocks,
    )
    return engine


def start_metrics(
    stack: contextlib.AsyncExitStack, config: ServeConfig, engine: AsyncEngine
) -> int | None:
    """Serve the engine's Prometheus metrics over HTTP, when a port is configured."""
    if config.metrics_port < 0:
        return None
    server, thread = start_http_server(
        config.metrics_port, addr=config.host, registry=engine.engine.metrics.registry
    )
    stack.callback(thread.join, 5.0)
    stack.callback(server.shutdown)
    port = server.server_address[1]
    log.info("metrics", url=f"http://{config.host}:{port}/metrics", metrics_port=port)
    return port


async def start_jobs(
    stack: contextlib.AsyncExitStack, config: ServeConfig, engine: AsyncEngine
) -> JobService | None:
    """The batch lane: NATS (embedded unless --nats-url), the job store and a worker."""
    from twolane.services import jobs

    nc, store = await jobs.start_job_store(
        stack, config.jobs, jobs.model_validator(engine), name="twolane-serve"
    )
    await jobs.start_job_worker(stack, nc, store, engine, config.jobs, config.grace_period_s)
    return store


async def start_grpc_server(
    stack: contextlib.AsyncExitStack,
    servicer: inference_pb2_grpc.InferenceServiceServicer,
    host: str,
    port: int,
    grace_period_s: float,
    **log_fields: object,
) -> int:
    """Serve `servicer` with health and reflection; returns the bound port.

    On exit the server turns NOT_SERVING, refuses new RPCs and gives in-flight ones
    `grace_period_s`.
    """
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    await server.start()

    async def drain() -> None:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace_period_s)

    stack.push_async_callback(drain)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening", host=host, port=bound, address=f"{host}:{bound}", **log_fields)
    return bound
