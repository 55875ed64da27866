"""The gateway's workers: joins, departures, draining, and the load routing sees."""

from __future__ import annotations

import asyncio

from twolane.services.membership import DRAINING, SERVING, STARTING, WorkerRecord
from twolane.services.workers import DEFAULT_MAX_NUM_SEQS, WorkerPool


def record(state: str = SERVING, address: str = "10.0.0.7:50051", **load: int) -> WorkerRecord:
    return WorkerRecord(
        address=address, worker_id="w1", state=state, block_size=16, max_num_seqs=32, **load
    )


async def test_only_serving_workers_get_calls() -> None:
    pool = WorkerPool()
    pool.update("a", record(STARTING, "10.0.0.1:1"))
    pool.update("b", record(SERVING, "10.0.0.2:1"))
    pool.update("c", record(DRAINING, "10.0.0.3:1"))
    assert [w.key for w in pool.routable()] == ["b"]
    assert len(pool.all()) == 3  # GetStats still asks the others
    await pool.close()


async def test_a_departed_worker_keeps_its_channel_until_its_last_call_ends() -> None:
    pool = WorkerPool()
    pool.update("a", record())
    worker = pool.workers["a"]
    with pool.calling(worker):
        pool.update("a", None)
        await asyncio.sleep(0)
        assert pool.routable() == [] and not worker.closed
    await asyncio.sleep(0)
    assert worker.closed
    await pool.close()


async def test_a_new_address_under_the_same_key_gets_a_new_channel() -> None:
    pool = WorkerPool()
    pool.update("a", record(address="10.0.0.1:1"))
    first = pool.workers["a"]
    pool.update("a", record(address="10.0.0.1:2"))
    assert pool.workers["a"] is not first and pool.workers["a"].address == "10.0.0.1:2"
    await asyncio.sleep(0)
    assert first.closed
    await pool.close()


async def test_the_load_is_the_larger_of_the_heartbeat_and_the_calls_in_flight() -> None:
    pool = WorkerPool()
    pool.update("a", record(num_running_interactive=2, num_waiting_interactive=1))
    worker = pool.workers["a"]
    assert worker.candidate(None).num_active == 3
    for _ in range(5):
        worker.num_in_flight += 1
    assert worker.candidate(None).num_active == 5
    assert worker.candidate(None).max_num_seqs == 32
    await pool.close()


async def test_static_workers_rotate_and_know_nothing_of_caches() -> None:
    pool = WorkerPool.static(("10.0.0.1:1", "10.0.0.1:1"))
    keys = [w.key for w in pool.routable()]
    assert len(set(keys)) == 2  # the same address twice: two turns
    candidate = pool.routable()[0].candidate(None)
    assert (candidate.block_size, candidate.index) == (0, None)
    assert candidate.max_num_seqs == DEFAULT_MAX_NUM_SEQS
    await pool.close()
