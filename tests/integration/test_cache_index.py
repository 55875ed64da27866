"""Cache events over a real nats-server: the worker's relay and the gateway's index.

The relay reads a real ZMQ socket where an engine core would publish; the index is fed
by the relay or by messages published on the subjects it listens to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import nats
import pytest
import zmq
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from twolane.scheduler.protocol import CacheEvents, EngineAddress
from twolane.services.cache_events import (
    CacheIndex,
    CacheRelay,
    CacheSnapshot,
    events_subject,
    snapshot_subject,
)
from twolane.services.membership import WorkerRecord, worker_key

from .nats_fixtures import NatsServer

encode = msgspec.msgpack.encode
# A worker's key is its address made a KV key: dots and all, several subject tokens.
ADDRESS = "127.0.0.1:1"
KEY = worker_key(ADDRESS)


def record(instance_id: str = "core-1") -> WorkerRecord:
    return WorkerRecord(
        address=ADDRESS,
        worker_id="w",
        state="serving",
        engine_instance_id=instance_id,
        block_size=16,
        num_total_blocks=100,
    )


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    give_up_s = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up_s:
            pytest.fail(f"never: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


class Snapshots:
    """Answers a worker's snapshot requests with `current`, and counts them."""

    def __init__(self, current: CacheSnapshot) -> None:
        self.current = current
        self.num_requests = 0

    async def respond(self, msg: Msg) -> None:
        self.num_requests += 1
        await msg.respond(encode(self.current))


async def test_the_index_takes_a_snapshot_on_join_then_follows_the_events(nc: NATS) -> None:
    snapshots = Snapshots(CacheSnapshot("core-1", 4, 16, [1, 2, 3]))
    await nc.subscribe(snapshot_subject(KEY), cb=snapshots.respond)
    index = CacheIndex(nc)
    await index.start()
    try:
        index.track(KEY, record())
        held = index.index(KEY)
        assert held is not None
        await eventually(lambda: len(held) == 3, "the snapshot is applied")
        await nc.publish(events_subject(KEY), encode(CacheEvents("core-1", 5, 16, [4], [1])))
        await eventually(lambda: 4 in held, "the events are applied")
        assert 1 not in held and snapshots.num_requests == 1
        # An old message changes nothing.
        await nc.publish(events_subject(KEY), encode(CacheEvents("core-1", 3, 16, [99], [])))
        await nc.flush()
        await asyncio.sleep(0.1)
        assert 99 not in held
    finally:
        await index.close()


async def test_a_missed_message_brings_a_snapshot_and_later_events_are_replayed(
    nc: NATS,
) -> None:
    snapshots = Snapshots(CacheSnapshot("core-1", -1, 16, []))
    await nc.subscribe(snapshot_subject(KEY), cb=snapshots.respond)
    index = CacheIndex(nc)
    await index.start()
    try:
        index.track(KEY, record())
        await eventually(lambda: snapshots.num_requests == 1, "the join's snapshot")
        await asyncio.sleep(0.1)
        held = index.index(KEY)
        assert held is not None
        # seq 0 and 1 are lost; the worker's mirror as of seq 1 holds 10 and 11.
        snapshots.current = CacheSnapshot("core-1", 1, 16, [10, 11])
        await nc.publish(events_subject(KEY), encode(CacheEvents("core-1", 2, 16, [12], [])))
        await eventually(lambda: snapshots.num_requests == 2, "a snapshot after the gap")
        await eventually(lambda: all(h in held for h in (10, 11, 12)), "the resync")
        assert len(held) == 3
    finally:
        await index.close()


async def test_a_new_engine_instance_empties_the_index(nc: NATS) -> None:
    snapshots = Snapshots(CacheSnapshot("core-1", 0, 16, [1, 2]))
    await nc.subscribe(snapshot_subject(KEY), cb=snapshots.respond)
    index = CacheIndex(nc)
    await index.start()
    try:
        index.track(KEY, record())
        held = index.index(KEY)
        assert held is not None
        await eventually(lambda: len(held) == 2, "the first engine's blocks")
        snapshots.current = CacheSnapshot("core-2", 0, 16, [7])
        await nc.publish(events_subject(KEY), encode(CacheEvents("core-2", 0, 16, [7], [])))
        await eventually(lambda: 7 in held and 1 not in held, "the restarted engine's blocks")
        index.track(KEY, None)
        assert index.index(KEY) is None
    finally:
        await index.close()


async def test_the_relay_forwards_the_engine_events_and_serves_its_mirror(
    nc: NATS, tmp_path: Path
) -> None:
    address = EngineAddress(tmp_path)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(address.cache_events)
    relay = CacheRelay(nc, KEY, address)
    received: list[CacheEvents] = []

    async def collect(msg: Msg) -> None:
        received.append(msgspec.msgpack.decode(msg.data, type=CacheEvents))

    await nc.subscribe(events_subject(KEY), cb=collect)
    await relay.start()
    try:
        sent = [
            CacheEvents("core-1", 0, 16, [1, 2, 3], []),
            CacheEvents("core-1", 1, 16, [4], [2]),
        ]
        # A SUB socket that just connected misses what was sent before: send until seen.
        give_up_s = time.monotonic() + 10
        while not received:
            pub.send(encode(sent[0]))
            await asyncio.sleep(0.05)
            assert time.monotonic() < give_up_s, "the relay never forwarded anything"
        pub.send(encode(sent[1]))
        await eventually(lambda: received[-1] == sent[1], "the second message")
        reply = await nc.request(snapshot_subject(KEY), b"", timeout=2)
        snapshot = msgspec.msgpack.decode(reply.data, type=CacheSnapshot)
        assert (snapshot.instance_id, snapshot.seq, snapshot.block_size) == ("core-1", 1, 16)
        assert snapshot.hashes == [1, 3, 4]
    finally:
        await relay.close()
        pub.close(linger=0)
        ctx.term()
