"""Prefix-cache events from the workers' engines to the gateways, over NATS.

The engine core publishes the block hashes entering and leaving its prefix cache on a
ZMQ socket (`CacheEvents`, scheduler/protocol.py). On a worker, `CacheRelay` (in the
supervisor) forwards each message unchanged to `twolane.cache.events.<worker key>`
(core NATS: at most once) and keeps a mirror of the hashes, which it sends on request
to `twolane.cache.snapshot.<worker key>`. On a gateway, `CacheIndex` applies the
events to one `PrefixIndex` per worker, and asks for a snapshot when it meets a worker,
when it notices a lost message (a gap in `seq`) and when the worker's engine started
again. The index stays approximate (a message may be lost between two snapshots); a
wrong guess costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import structlog
import zmq
import zmq.asyncio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from twolane.scheduler.protocol import CacheEvents, EngineAddress, cache_events_decoder
from twolane.services.routing import PrefixIndex

if TYPE_CHECKING:
    from twolane.services.membership import WorkerRecord

log = structlog.get_logger(__name__)

EVENTS_SUBJECT_PREFIX = "twolane.cache.events"
SNAPSHOT_SUBJECT_PREFIX = "twolane.cache.snapshot"
SNAPSHOT_TIMEOUT_S = 2.0
# Events kept per worker to replay after a snapshot that was taken before them.
REPLAY_DEPTH = 256
_HASH_BYTES_IN_MSGPACK = 9  # a uint64 is one marker byte and eight bytes
_SNAPSHOT_OVERHEAD_BYTES = 1024


def events_subject(key: str) -> str:
    return f"{EVENTS_SUBJECT_PREFIX}.{key}"


def snapshot_subject(key: str) -> str:
    return f"{SNAPSHOT_SUBJECT_PREFIX}.{key}"


class CacheSnapshot(msgspec.Struct, frozen=True):
    """Every hash a worker's prefix cache holds, as of its events up to `seq`
    (-1: none yet), newest last."""

    instance_id: str
    seq: int
    block_size: int
    hashes: list[int]


_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(CacheSnapshot)


# ---- the worker's side ------------------------------------------------------------------


class CacheRelay:
    """Forwards one engine core's cache events to NATS and answers snapshot requests."""

    def __init__(self, nc: NATS, key: str, address: EngineAddress) -> None:
        self.key = key
        self._nc = nc
        self._address = address
        self._ctx = zmq.asyncio.Context()
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._snapshots: Subscription | None = None
        self._instance_id = ""
        self._seq = -1
        self._block_size = 0
        self._mirror: OrderedDict[int, None] = OrderedDict()

    async def start(self) -> None:
        """Connect (the core may not be up yet: ZMQ connects when it is)."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self._address.cache_events)
        self._sub = sub
        self._snapshots = await self._nc.subscribe(snapshot_subject(self.key), cb=self._reply)
        self._task = asyncio.create_task(self._relay(sub), name="twolane-cache-relay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._snapshots is not None:
            with contextlib.suppress(Exception):
                await self._snapshots.unsubscribe()
        if self._sub is not None:
            self._sub.close(linger=0)
        self._ctx.destroy(linger=0)

    async def _relay(self, sub: zmq.asyncio.Socket) -> None:
        subject = events_subject(self.key)
        while True:
            payload = await sub.recv()
            try:
                events = cache_events_decoder.decode(payload)
            except msgspec.DecodeError:
                log.error("unreadable cache events dropped")
                continue
            self._mirror_apply(events)
            try:
                await self._nc.publish(subject, payload)
            except Exception as exc:  # NATS away: the gateways resync by snapshot
                log.debug("cache events not relayed", error=repr(exc))

    def _mirror_apply(self, events: CacheEvents) -> None:
        if events.instance_id != self._instance_id:
            # A new engine core: its cache starts empty.
            self._mirror.clear()
            self._instance_id = events.instance_id
        elif events.seq > self._seq + 1:
            log.warning("cache events lost", missed=events.seq - self._seq - 1)
        self._seq = events.seq
        self._block_size = events.block_size
        for block_hash in events.evicted:
            self._mirror.pop(block_hash, None)
        for block_hash in events.stored:
            self._mirror[block_hash] = None

    def snapshot(self, max_bytes: int) -> CacheSnapshot:
        """The mirror, newest hashes kept when all of them would not fit `max_bytes`."""
        limit = max(0, (max_bytes - _SNAPSHOT_OVERHEAD_BYTES) // _HASH_BYTES_IN_MSGPACK)
        hashes = list(self._mirror)[-limit:] if limit else []
        return CacheSnapshot(self._instance_id, self._seq, self._block_size, hashes)

    async def _reply(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            await msg.respond(_encoder.encode(self.snapshot(self._nc.max_payload)))


# ---- the gateway's side -----------------------------------------------------------------


@dataclass
class _WorkerCache:
    instance_id: str
    index: PrefixIndex
    seq: int = -1
    recent: deque[CacheEvents] = field(default_factory=lambda: deque(maxlen=REPLAY_DEPTH))
    resyncing: bool = False  # a snapshot request is on its way
    resync_again: bool = False  # and another one is due after it


class CacheIndex:
    """What each worker's prefix cache holds, approximately, from its events."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._workers: dict[str, _WorkerCache] = {}
        self._subscription: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # `>`, not `*`: a worker's key is its address, whose dots make several tokens.
        self._subscription = await self._nc.subscribe(
            f"{EVENTS_SUBJECT_PREFIX}.>", cb=self._on_events
        )

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        for task in list(self._tasks):
            task.cancel()

    def index(self, key: str) -> PrefixIndex | None:
        cache = self._workers.get(key)
        return cache.index if cache is not None else None

    def track(self, key: str, record: WorkerRecord | None) -> None:
        """Follow membership: a new worker, a new engine, or a worker gone."""
        if record is None:
            self._workers.pop(key, None)
            return
        cache = self._workers.get(key)
        capacity = record.num_total_blocks or 1
        if cache is None:
            cache = self._workers[key] = _WorkerCache(
                record.engine_instance_id, PrefixIndex(capacity)
            )
            self._resync(key)
            return
        cache.index.capacity = max(1, capacity)
        if record.engine_instance_id and record.engine_instance_id != cache.instance_id:
            self._restart(key, cache, record.engine_instance_id)

    def _restart(self, key: str, cache: _WorkerCache, instance_id: str) -> None:
        cache.instance_id = instance_id
        cache.index.replace(())
        cache.seq = -1
        cache.recent.clear()
        self._resync(key)

    async def _on_events(self, msg: Msg) -> None:
        key = msg.subject[len(EVENTS_SUBJECT_PREFIX) + 1 :]
        cache = self._workers.get(key)
        if cache is None:
            return  # not (yet) a member: its snapshot will come when it joins
        try:
            events = cache_events_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if events.instance_id != cache.instance_id:
            self._restart(key, cache, events.instance_id)
        if events.seq <= cache.seq:
            return
        if events.seq != cache.seq + 1:
            self._resync(key)
        self._apply(cache, events)

    @staticmethod
    def _apply(cache: _WorkerCache, events: CacheEvents) -> None:
        cache.index.evict(events.evicted)
        cache.index.store(events.stored)
        cache.seq = events.seq
        cache.recent.append(events)

    def _resync(self, key: str) -> None:
        cache = self._workers.get(key)
        if cache is None:
            return
        if cache.resyncing:
            cache.resync_again = True
            return
        cache.resyncing = True
        task = asyncio.ensure_future(self._fetch_snapshot(key, cache))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_snapshot(self, key: str, cache: _WorkerCache) -> None:
        try:
            reply = await self._nc.request(snapshot_subject(key), b"", timeout=SNAPSHOT_TIMEOUT_S)
            snapshot: CacheSnapshot | None = _snapshot_decoder.decode(reply.data)
        except Exception as exc:  # the events alone still fill the index
            log.debug("no cache snapshot", worker=key, error=repr(exc))
            snapshot = None
        finally:
            cache.resyncing = False
        current = self._workers.get(key) is cache
        if current and snapshot is not None and snapshot.instance_id == cache.instance_id:
            self._apply_snapshot(cache, snapshot)
        if current and cache.resync_again:
            cache.resync_again = False
            self._resync(key)

    @staticmethod
    def _apply_snapshot(cache: _WorkerCache, snapshot: CacheSnapshot) -> None:
        """The snapshot, then the events that came after it."""
        cache.index.replace(snapshot.hashes)
        cache.seq = snapshot.seq
        for events in list(cache.recent):
            if events.instance_id == snapshot.instance_id and events.seq > snapshot.seq:
                cache.index.evict(events.evicted)
                cache.index.store(events.stored)
                cache.seq = events.seq
