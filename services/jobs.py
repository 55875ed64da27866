"""The seam where the batch lane plugs into the gateway, and how a process starts it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import nats
import structlog
from nats.aio.client import Client as NATS

from twolane.services import jetstream
from twolane.services.availability import Availability
from twolane.services.config import JobsConfig, WebhookConfig
from twolane.services.jetstream import DEFAULT_TENANT
from twolane.services.job_store import JobStore, Validator
from twolane.services.nats_auth import read_credentials
from twolane.services.nats_embedded import EmbeddedNats
from twolane.services.process import unless_stopped
from twolane.services.prompts import ShapeOnly
from twolane.services.validation import ModelLimits, validate_generate
from twolane.services.webhook_urls import UrlPolicy
from twolane.services.worker_slot import WorkerSlot
from twolane.v1 import generate_pb2, inference_pb2, jobs_pb2

if TYPE_CHECKING:
    from twolane.scheduler.client import EngineClient
    from twolane.services.prompts import ModelPrompts, PromptEncoder

log = structlog.get_logger(__name__)

NATS_CONNECT_TIMEOUT_S = 5.0
NATS_PING_INTERVAL_S = 2.0
RECHECK_INTERVAL_S = 1.0
# Without a model, a gateway checks a job's shape only; these bounds never bind.
_NO_MODEL_LIMITS = ModelLimits(vocab_size=2**31 - 1, max_model_len=2**31 - 1)


class JobService(Protocol):
    """Durable jobs behind SubmitJob, GetResult and CancelJob.

    Implementations raise the typed errors of `twolane.services.errors`
    (NotFoundError for an unknown job id, InvalidArgumentError for a bad
    request, ...); the gateway maps them to status codes. `tenant` scopes job
    ids and idempotency keys; it is "default" while auth is off.
    """

    async def submit_job(
        self, request: jobs_pb2.SubmitJobRequest, tenant: str = DEFAULT_TENANT
    ) -> jobs_pb2.SubmitJobResponse: ...

    async def get_result(
        self, request: jobs_pb2.GetResultRequest, tenant: str = DEFAULT_TENANT
    ) -> jobs_pb2.GetResultResponse: ...

    async def cancel_job(
        self, request: jobs_pb2.CancelJobRequest, tenant: str = DEFAULT_TENANT
    ) -> jobs_pb2.CancelJobResponse: ...

    async def fill_backlog(self, reply: inference_pb2.GetStatsResponse) -> None: ...


def model_validator(limits: ModelLimits, prompts: PromptEncoder) -> Validator:
    """Checks a job's request against the engine's model, as Generate does."""

    def validate(request: generate_pb2.GenerateRequest) -> None:
        validate_generate(request, limits, prompts, prefix="request.")

    return validate


def shape_validator(request: generate_pb2.GenerateRequest) -> None:
    """Checks a job's request without a model; the worker checks the rest."""
    validate_generate(request, _NO_MODEL_LIMITS, ShapeOnly(), prefix="request.")


async def start_nats(
    stack: contextlib.AsyncExitStack, config: JobsConfig, server_config: Path | None = None
) -> str:
    """The URL to use: `config.nats_url`, or an embedded nats-server started here (with
    `server_config`, when given: users and permissions)."""
    if config.nats_url:
        return config.nats_url
    embedded = EmbeddedNats(Path(config.data_dir), config_file=server_config)
    url = await embedded.start()
    stack.push_async_callback(embedded.stop)
    return url


async def connect(
    stack: contextlib.AsyncExitStack,
    url: str,
    name: str,
    creds: str = "",
    timeout_s: float = NATS_CONNECT_TIMEOUT_S,
    availability: Availability | None = None,
) -> NATS:
    """A connection that reconnects forever once made, and drains on exit.

    The first connection gets `timeout_s`: a NATS that cannot be reached is a one-line
    error naming it, not a process that hangs (nats-py alone would retry forever).
    `creds` names a file with the user and password to connect as. `url` may list
    several servers of one cluster, comma separated (the rest are discovered).

    Raises:
        OSError: NATS did not answer in time, or refused the credentials.
    """
    user, password = read_credentials(Path(creds)) if creds else (None, None)
    errors: list[Exception] = []
    connected = False

    async def on_disconnect() -> None:
        log.warning("nats disconnected", url=url)
        if availability is not None:
            availability.set(False)

    async def on_reconnect() -> None:
        log.info("nats reconnected", url=url)
        if availability is not None:
            availability.set(True)

    async def on_error(exc: Exception) -> None:
        # While connecting, failures are gathered for the one error raised below. Once
        # connected, this also hears exceptions raised in subscription callbacks.
        if not connected:
            errors.append(exc)
            log.debug("nats error", error=repr(exc))
        else:
            log.warning("nats error", url=url, error=repr(exc))

    log.info("connecting to nats", url=url, name=name, timeout_s=timeout_s)
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                # A cluster's URLs, comma separated; the client also learns the others
                # from the server it reaches.
                [part.strip() for part in url.split(",") if part.strip()],
                name=name,
                user=user,
                password=password,
                connect_timeout=min(timeout_s, NATS_CONNECT_TIMEOUT_S),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                # A frozen server (no TCP reset) is noticed after two missed pings.
                ping_interval=NATS_PING_INTERVAL_S,
                max_outstanding_pings=2,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
            ),
            timeout_s,
        )
    except TimeoutError:
        cause = f": {errors[-1]}" if errors else ""
        raise OSError(f"cannot reach NATS at {url} within {timeout_s:g} s{cause}") from None
    except Exception as exc:
        raise OSError(f"cannot connect to NATS at {url}: {exc}") from exc
    connected = True

    watch = asyncio.ensure_future(_recheck(nc, availability)) if availability else None

    async def close() -> None:
        if watch is not None:
            watch.cancel()
        with contextlib.suppress(Exception):
            await nc.drain()

    stack.push_async_callback(close)
    return nc


async def _recheck(nc: NATS, availability: Availability) -> None:
    """While NATS counts as away, ask it every second whether it answers again: a server
    that was frozen comes back without a reconnect, and nothing else would notice."""
    while True:
        await asyncio.sleep(RECHECK_INTERVAL_S)
        if availability.available or not nc.is_connected:
            continue
        with contextlib.suppress(Exception):
            # nats-py annotates `timeout` as int; it goes to asyncio.wait_for (float s).
            await nc.flush(timeout=RECHECK_INTERVAL_S)  # type: ignore[arg-type]
            availability.set(True)


async def start_job_store(
    stack: contextlib.AsyncExitStack,
    config: JobsConfig,
    validate: Validator,
    name: str,
    tenant_max_queued: int | None = None,
    stop: asyncio.Event | None = None,
    availability: Availability | None = None,
    webhooks: WebhookConfig | None = None,
) -> tuple[NATS, JobStore]:
    """Connect to NATS, lay out the streams and buckets, and return the store.

    `tenant_max_queued` caps each tenant's queued jobs (with auth on); `stop` set while
    connecting ends the wait (StopBeforeReady); `webhooks` says which webhook URLs
    submissions may carry (default: https to public addresses)."""
    url = await start_nats(stack, config)
    connecting = connect(stack, url, name, config.nats_creds, availability=availability)
    nc = await (unless_stopped(connecting, stop) if stop is not None else connecting)
    try:
        buckets = await jetstream.ensure_layout(nc.jetstream(), config)
    except Exception as exc:
        raise OSError(f"cannot set up JetStream at {url}: {exc}") from exc
    log.info("job queue ready", nats_url=url, stream=jetstream.JOBS_STREAM)
    policy = UrlPolicy.from_config(webhooks) if webhooks is not None else None
    return nc, JobStore(nc, buckets, validate, config, tenant_max_queued, availability, policy)


async def start_job_worker(
    stack: contextlib.AsyncExitStack,
    nc: NATS,
    store: JobStore,
    engine: EngineClient,
    prompts: ModelPrompts,
    config: JobsConfig,
    grace_period_s: float,
    tenant_limit: Callable[[str], int] | None = None,
) -> None:
    from twolane.scheduler.config import served_model_name
    from twolane.services.job_metrics import JobMetrics
    from twolane.services.job_worker import JobWorker

    assert engine.info is not None
    # The worker's identity outlives its process: see worker_slot.py.
    slot = WorkerSlot.acquire(Path(config.data_dir))
    stack.callback(slot.close)
    metrics = JobMetrics(nc.jetstream(), store, served_model_name(engine.info.model))
    metrics.start()
    stack.push_async_callback(metrics.stop)
    worker = JobWorker(
        nc,
        store,
        engine,
        prompts,
        config,
        slot,
        tenant_limits=tenant_limit,
        metrics=metrics,
    )
    await worker.start()
    stack.push_async_callback(worker.stop, grace_period_s)
