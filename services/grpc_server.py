"""Starting a gRPC server the way every twolane front does: health, reflection, drain."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twolane.scheduler.client import EngineClient
from twolane.services import handlers
from twolane.services.config import ListenConfig
from twolane.v1 import inference_pb2, inference_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int


async def start_grpc_server(
    stack: contextlib.AsyncExitStack,
    servicer: inference_pb2_grpc.InferenceServiceServicer,
    listen: ListenConfig,
    *,
    reuse_port: bool = False,
    engine: EngineClient | None = None,
    **log_fields: object,
) -> RunningServer:
    """Serve `servicer` with health and reflection, and log the `listening` line.

    The port is never shared by accident: SO_REUSEPORT is off unless `reuse_port` (the
    frontends of one `twolane serve`, whose supervisor has checked the port is theirs).
    With `engine`, the health of InferenceService follows it: NOT_SERVING while the
    engine core is down. On exit the server turns NOT_SERVING, refuses new RPCs and
    gives in-flight ones the grace period.

    Raises:
        OSError: the address cannot be bound (in use, or not an address of this host).
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    # Not the generated add_InferenceServiceServicer_to_server: its decoding raises inside
    # grpc on a malformed body, which the client then sees as UNKNOWN.
    handlers.add_servicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{listen.host}:{listen.port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if not bound:
        raise OSError(f"cannot listen on {address}: the address is in use or not available")
    await server.start()

    async def drain() -> None:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(listen.grace_period_s)

    stack.push_async_callback(drain)
    await _follow_engine(health_servicer, engine)
    log.info(
        "listening", host=listen.host, port=bound, address=f"{listen.host}:{bound}", **log_fields
    )
    return RunningServer(server, health_servicer, bound)


async def _follow_engine(
    health_servicer: health.aio.HealthServicer, engine: EngineClient | None
) -> None:
    async def set_all(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    if engine is None:
        await set_all(_SERVING)
        return
    tasks: set[asyncio.Task[None]] = set()

    def on_ready(ready: bool) -> None:
        task = asyncio.ensure_future(set_all(_SERVING if ready else _NOT_SERVING))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    engine.add_ready_listener(on_ready)
    await set_all(_SERVING if engine.is_ready else _NOT_SERVING)
