"""Starting a gRPC server the way every twolane front does: health, reflection, drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twolane.scheduler.client import EngineClient
from twolane.services import handlers
from twolane.services.auth import AuthInterceptor
from twolane.services.availability import Availability
from twolane.services.config import ListenConfig, SecurityConfig
from twolane.services.keys import KeyStore
from twolane.v1 import inference_pb2, inference_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# The health name of the batch lane: NOT_SERVING while NATS does not answer.
JOBS_HEALTH_NAME = "twolane.v1.Jobs"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# Bounds against oversized messages and slow or idle clients (see README, "Security").
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CONNECTION_LIMITS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # At most this many calls in flight on one connection.
    ("grpc.max_concurrent_streams", 1024),
    # Close connections idle this long, and every connection after this age (with a
    # grace period for the calls still on it), so none is held open forever.
    ("grpc.max_connection_idle_ms", 15 * 60 * 1000),
    ("grpc.max_connection_age_ms", 2 * 60 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 5 * 60 * 1000),
    # Keepalive enforcement: a client pinging more often than every 10 s is cut off.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


def server_credentials(security: SecurityConfig) -> grpc.ServerCredentials:
    """TLS credentials from the PEM files; with a client CA, client certificates are
    required and verified."""
    key = Path(security.tls_key).read_bytes()
    cert = Path(security.tls_cert).read_bytes()
    client_ca = Path(security.tls_client_ca).read_bytes() if security.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


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
    security: SecurityConfig | None = None,
    keys: KeyStore | None = None,
    reuse_port: bool = False,
    engine: EngineClient | None = None,
    jobs_availability: Availability | None = None,
    **log_fields: object,
) -> RunningServer:
    """Serve `servicer` with health and reflection, and log the `listening` line.

    The port is never shared by accident: SO_REUSEPORT is off unless `reuse_port` (the
    frontends of one `twolane serve`, whose supervisor has checked the port is theirs).
    With `keys`, every call but health and reflection needs an API key; with the
    security config's certificate, the port speaks TLS only (mutual TLS with a client
    CA). With `engine`, the health of InferenceService (and of the server, "") follows
    it: NOT_SERVING while the engine core is down; with `jobs_availability`, the health
    of twolane.v1.Jobs follows NATS. On exit the server turns NOT_SERVING, refuses new RPCs and
    gives in-flight ones the grace period.

    Raises:
        OSError: the address cannot be bound (in use, or not an address of this host).
    """
    interceptors = [AuthInterceptor(keys)] if keys is not None else []
    options = [("grpc.so_reuseport", 1 if reuse_port else 0), *CONNECTION_LIMITS]
    server = grpc.aio.server(interceptors=interceptors, options=options)
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
        if security is not None and security.tls_cert:
            bound = server.add_secure_port(address, server_credentials(security))
        else:
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
    if jobs_availability is not None:
        _follow(health_servicer, (JOBS_HEALTH_NAME,), jobs_availability.listen)
    log.info(
        "listening", host=listen.host, port=bound, address=f"{listen.host}:{bound}", **log_fields
    )
    return RunningServer(server, health_servicer, bound)


async def _follow_engine(
    health_servicer: health.aio.HealthServicer, engine: EngineClient | None
) -> None:
    if engine is None:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, _SERVING)
        return
    _follow(health_servicer, ("", SERVICE_NAME), engine.add_ready_listener)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, _SERVING if engine.is_ready else _NOT_SERVING)


def _follow(
    health_servicer: health.aio.HealthServicer,
    names: tuple[str, ...],
    listen: Callable[[Callable[[bool], None]], None],
) -> None:
    """Keep `names` SERVING exactly while what `listen` reports is up."""
    tasks: set[asyncio.Task[None]] = set()

    async def set_all(serving: bool) -> None:
        for name in names:
            await health_servicer.set(name, _SERVING if serving else _NOT_SERVING)

    def on_change(serving: bool) -> None:
        task = asyncio.ensure_future(set_all(serving))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    listen(on_change)
