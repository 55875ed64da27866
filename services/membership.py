"""Workers that find the gateways: the `twolane_workers` bucket, announced and watched.

Each `twolane worker` keeps one record in the `twolane_workers` KV bucket (key: its
advertised address), put again every `--heartbeat-interval-s` with its load. The bucket
keeps a record for `--worker-ttl-s` after its last put, and a gateway drops a worker it
has not heard from for that long, so a worker that dies leaves the gateways' view within
the TTL. A worker that drains (SIGTERM) says so at once, and gets no new requests; when
it has stopped it deletes its record. One process per worker announces it: the
worker's supervisor, whatever `--api-server-count` is.

Records are JSON (`WorkerRecord`), readable with `nats kv get twolane_workers KEY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from twolane.scheduler.client import EngineClient
from twolane.scheduler.config import served_model_name
from twolane.scheduler.protocol import EngineAddress
from twolane.services import jetstream
from twolane.services.availability import Availability
from twolane.services.cache_events import CacheRelay
from twolane.services.config import ClusterConfig, split_host_port
from twolane.services.model_files import publish_tokenizer

log = structlog.get_logger(__name__)

WORKERS_BUCKET = "twolane_workers"
STARTING, SERVING, DRAINING = "starting", "serving", "draining"
PUT_TIMEOUT_S = 2.0
_KEY_UNSAFE = re.compile(r"[^-_=.a-zA-Z0-9]")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
# The TTL a gateway gives the bucket when no worker has laid it out yet.
_DEFAULT_TTL_S = ClusterConfig().worker_ttl_s


class WorkerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One worker as the gateways see it; the load is as of `updated_at`."""

    address: str  # HOST:PORT of its gRPC API
    worker_id: str  # new for every start of the worker
    state: str  # starting | serving | draining
    model: str = ""
    engine_instance_id: str = ""  # new for every start of its engine core (cache empty)
    block_size: int = 0
    max_num_seqs: int = 0
    tokenizer: str = ""  # digest of its tokenizer files in twolane_models; "" if none
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_running_interactive: int = 0
    num_waiting_interactive: int = 0
    num_running_batch: int = 0
    num_waiting_batch: int = 0
    step_time_s: float = 0.0
    heartbeat_interval_s: float = 1.0
    ttl_s: float = 5.0
    updated_at: float = 0.0  # wall clock (time.time()) of the worker

    @property
    def num_active_interactive(self) -> int:
        return self.num_running_interactive + self.num_waiting_interactive


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(WorkerRecord)


def decode_record(data: bytes) -> WorkerRecord:
    return _decoder.decode(data)


def worker_key(address: str) -> str:
    """The bucket key of the worker at `address` (KV keys allow few characters)."""
    return _KEY_UNSAFE.sub("_", address)


def advertised_address(cluster: ClusterConfig, host: str, port: int) -> str:
    """Where gateways reach this worker: `--advertise-address`, completed with the port
    it listens on; by default the listening host, or this machine's name when that is
    a wildcard."""
    if cluster.advertise_address:
        advertised_host, advertised_port = split_host_port(cluster.advertise_address)
        return f"{advertised_host}:{advertised_port or port}"
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def bucket_config(ttl_s: float, num_replicas: int = 1) -> api.StreamConfig:
    """The bucket's stream: one record per worker, gone `ttl_s` after its last put. In
    memory: the records are refreshed every second and worthless after a restart."""
    return api.StreamConfig(
        name=f"KV_{WORKERS_BUCKET}",
        description="workers of the fleet, their address and load, by address",
        subjects=[f"$KV.{WORKERS_BUCKET}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.MEMORY,
        discard=api.DiscardPolicy.NEW,
        max_msgs_per_subject=1,
        max_age=ttl_s,
        duplicate_window=min(jetstream.JOBS_DUPLICATE_WINDOW_S, ttl_s),
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        num_replicas=num_replicas,
    )


async def workers_bucket(
    js: JetStreamContext, ttl_s: float, update: bool, num_replicas: int = 1
) -> KeyValue:
    """The bucket, created when missing; with `update` (workers) its TTL is set to
    `ttl_s` too. A gateway never changes it: the workers' TTL is the one that counts."""
    config = bucket_config(ttl_s, num_replicas)
    if update:
        await jetstream.ensure_stream(js, config)
    else:
        try:
            await js.stream_info(config.name or "")
        except nats.js.errors.NotFoundError:
            await jetstream.ensure_stream(js, config)
    return await js.key_value(WORKERS_BUCKET)


# ---- the worker's side ------------------------------------------------------------------


async def announce_worker(
    stack: contextlib.AsyncExitStack,
    nc: NATS,
    cluster: ClusterConfig,
    address: str,
    ipc_dir: Path,
    serving: Callable[[], bool],
    num_replicas: int = 1,
) -> WorkerAnnouncer:
    """Announce the worker whose engine core is at `ipc_dir`, and relay its cache events;
    both stop when `stack` closes (the record is deleted then). `num_replicas`: of the
    bucket and the tokenizer store (`--nats-replicas`)."""
    engine_address = EngineAddress(ipc_dir)
    engine = EngineClient(engine_address, name="announcer")
    await engine.start()
    stack.push_async_callback(engine.close)
    relay = CacheRelay(nc, worker_key(address), engine_address)
    await relay.start()
    stack.push_async_callback(relay.close)
    announcer = WorkerAnnouncer(nc, cluster, address, engine, serving, num_replicas)
    await announcer.start()
    stack.push_async_callback(announcer.close)
    return announcer


class WorkerAnnouncer:
    """Keeps this worker's record fresh in the bucket, with its engine's load.

    Args:
        nc: the supervisor's NATS connection.
        engine: a ready-or-not client of the worker's engine core (for its info and load).
        serving: whether the worker's frontends are up (the supervisor knows).
        num_replicas: of the bucket and the tokenizer store, where this worker makes them.
    """

    def __init__(
        self,
        nc: NATS,
        cluster: ClusterConfig,
        address: str,
        engine: EngineClient,
        serving: Callable[[], bool],
        num_replicas: int = 1,
    ) -> None:
        self.address = address
        self.key = worker_key(address)
        self.worker_id = uuid.uuid4().hex[:12]
        self._nc = nc
        self._cluster = cluster
        self._engine = engine
        self._serving = serving
        self._num_replicas = num_replicas
        self._kv: KeyValue | None = None
        self._draining = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tokenizer = ""
        self._tokenizer_dir = ""
        self._failing = False

    async def start(self) -> None:
        js = self._nc.jetstream()
        self._kv = await workers_bucket(
            js, self._cluster.worker_ttl_s, update=True, num_replicas=self._num_replicas
        )
        self._engine.add_ready_listener(lambda _: self.wake())
        self._task = asyncio.create_task(self._run(), name="twolane-announce")
        log.info("announcing worker", address=self.address, key=self.key)

    def wake(self) -> None:
        """Announce now (the worker's state changed)."""
        self._wake.set()

    async def drain(self) -> None:
        """Tell the gateways at once that this worker takes no new requests; the record
        stays, as `draining`, until `close`."""
        self._draining = True
        await self._put()
        log.info("worker draining announced", address=self.address)
        # Its load no longer matters; and its engine core is about to stop, which a
        # client still connected would report as an engine failure.
        await self._engine.close()

    async def close(self) -> None:
        """Stop announcing and delete the record (if it is still this worker's)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._kv is None:
            return
        with contextlib.suppress(Exception):
            entry = await asyncio.wait_for(self._kv.get(self.key), PUT_TIMEOUT_S)
            if entry.value and decode_record(entry.value).worker_id == self.worker_id:
                await asyncio.wait_for(
                    self._kv.delete(self.key, last=entry.revision), PUT_TIMEOUT_S
                )
                log.info("worker record deleted", address=self.address)

    async def _run(self) -> None:
        while True:
            await self._publish_tokenizer()
            await self._put()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._cluster.heartbeat_interval_s)

    async def _publish_tokenizer(self) -> None:
        info = self._engine.info
        if info is None or info.model_dir == self._tokenizer_dir:
            return
        try:
            self._tokenizer = await publish_tokenizer(
                self._nc.jetstream(), Path(info.model_dir), self._num_replicas
            )
            self._tokenizer_dir = info.model_dir
        except Exception as exc:  # retried at the next heartbeat; routing works without
            log.warning("cannot publish the tokenizer", error=repr(exc))

    def record(self) -> WorkerRecord:
        engine = self._engine
        state = SERVING if engine.is_ready and self._serving() else STARTING
        common = {
            "address": self.address,
            "worker_id": self.worker_id,
            "state": DRAINING if self._draining else state,
            "heartbeat_interval_s": self._cluster.heartbeat_interval_s,
            "ttl_s": self._cluster.worker_ttl_s,
            "updated_at": time.time(),
        }
        info, load = engine.info, engine.load
        if info is None or load is None:
            return WorkerRecord(**common)  # type: ignore[arg-type]
        return WorkerRecord(
            **common,  # type: ignore[arg-type]
            model=served_model_name(info.model),
            engine_instance_id=load.instance_id,
            block_size=info.block_size,
            max_num_seqs=info.max_num_seqs,
            tokenizer=self._tokenizer,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            num_running_interactive=load.num_running_interactive,
            num_waiting_interactive=load.num_waiting_interactive,
            num_running_batch=load.num_running_batch,
            num_waiting_batch=load.num_waiting_batch,
            step_time_s=load.step_time_s,
        )

    async def _put(self) -> None:
        assert self._kv is not None
        try:
            await asyncio.wait_for(
                self._kv.put(self.key, _encoder.encode(self.record())), PUT_TIMEOUT_S
            )
        except Exception as exc:
            if not self._failing:
                log.warning("cannot announce the worker", error=repr(exc))
            self._failing = True
            return
        if self._failing:
            log.info("worker announced again", address=self.address)
        self._failing = False


# ---- the gateway's side -----------------------------------------------------------------


@dataclass
class _Seen:
    record: WorkerRecord
    seen_s: float  # time.monotonic() of the last put heard


Listener = Callable[[str, WorkerRecord | None], None]


class Membership:
    """The workers the bucket lists, kept current by a watch.

    `listener(key, record)` hears every change: a join, a new record, and a departure
    (record None: deleted, or not heard from for its TTL). While this process cannot
    reach NATS it keeps its last view: it cannot tell, and a worker that is down answers
    UNAVAILABLE, which the gateway skips anyway.
    """

    def __init__(
        self,
        nc: NATS,
        availability: Availability,
        listener: Listener,
        num_replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._availability = availability
        self._listener = listener
        self._num_replicas = num_replicas  # of the bucket, if this process makes it
        self.workers: dict[str, _Seen] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._availability.listen(self._on_availability)
        self._tasks = [
            asyncio.create_task(self._watch(), name="twolane-membership-watch"),
            asyncio.create_task(self._sweep(), name="twolane-membership-sweep"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def records(self) -> list[WorkerRecord]:
        return [seen.record for seen in self.workers.values()]

    def _on_availability(self, available: bool) -> None:
        if available:
            # Back: give every worker one TTL to be heard again before it is dropped.
            now_s = time.monotonic()
            for seen in self.workers.values():
                seen.seen_s = now_s

    async def _watch(self) -> None:
        while True:
            try:
                kv = await workers_bucket(
                    self._nc.jetstream(),
                    _DEFAULT_TTL_S,
                    update=False,
                    num_replicas=self._num_replicas,
                )
                watcher = await kv.watchall()
                initial = True
                async for entry in watcher:
                    if entry is None:
                        initial = False  # the records that existed are all read
                        continue
                    self._apply(entry, initial)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot watch the workers", error=repr(exc))
                await asyncio.sleep(1.0)

    def _apply(self, entry: KeyValue.Entry, initial: bool) -> None:
        key = entry.key
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._drop(key, "deleted")
            return
        try:
            record = decode_record(entry.value)
        except msgspec.DecodeError:
            log.warning("unreadable worker record ignored", key=key)
            return
        seen_s = time.monotonic()
        # nats-py annotates Entry.created as an int, but sets the message's datetime.
        created: object = entry.created
        if initial and isinstance(created, datetime.datetime):
            # A record read when the watch starts may be old already: count its age (by
            # the server's clock; later records count from their arrival, so that clocks
            # set apart cannot make live workers look dead).
            seen_s -= min(max(0.0, time.time() - created.timestamp()), record.ttl_s)
        before = self.workers.get(key)
        self.workers[key] = _Seen(record, seen_s)
        if before is None:
            log.info(
                "worker joined", address=record.address, state=record.state, model=record.model
            )
        elif before.record.state != record.state:
            log.info("worker state", address=record.address, state=record.state)
        self._listener(key, record)

    def _drop(self, key: str, reason: str) -> None:
        seen = self.workers.pop(key, None)
        if seen is not None:
            log.info("worker left", address=seen.record.address, reason=reason)
            self._listener(key, None)

    async def _sweep(self) -> None:
        while True:
            ttls = [seen.record.ttl_s for seen in self.workers.values()]
            await asyncio.sleep(min(ttls, default=1.0) / 10)
            if not self._availability.available:
                continue
            now_s = time.monotonic()
            for key, seen in list(self.workers.items()):
                if now_s - seen.seen_s > seen.record.ttl_s:
                    self._drop(key, "no heartbeat within its ttl")
