"""The block manager notes what enters and leaves its prefix cache, last change winning."""

from __future__ import annotations

import itertools

from twolane.scheduler.block_manager import BlockManager, CacheEventLog
from twolane.scheduler.prefix_hash import prompt_block_hashes
from twolane.scheduler.request import Priority, SamplingParams
from twolane.scheduler.sequence import Sequence

_ids = itertools.count()


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence(f"s{next(_ids)}", token_ids, SamplingParams(), Priority.STANDARD, 0, 0.0)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    prefix = bm.match_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens - prefix.num_tokens, prefix)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_blocks(seq)


def test_events_are_off_unless_asked_for() -> None:
    assert BlockManager(num_blocks=4, block_size=4).events is None
    assert BlockManager(4, 4, enable_prefix_caching=False, record_events=True).events is None


def test_stored_blocks_are_reported_once_by_their_chained_hash() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, record_events=True)
    assert bm.events is not None
    tokens = list(range(10))
    compute_all(bm, make_seq(tokens))
    stored, evicted = bm.events.drain()
    assert stored == prompt_block_hashes(tokens, 4)
    assert evicted == []
    # The same prefix again is a hit: nothing new enters the cache.
    compute_all(bm, make_seq(tokens))
    assert bm.events.drain() == ([], [])


def test_an_equal_block_computed_twice_is_reported_by_its_first_writer_only() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, record_events=True)
    assert bm.events is not None
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    for seq in (a, b):  # both allocated before either is computed: no hit for b
        assert bm.allocate(seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.commit_full_blocks(seq)
    stored, _ = bm.events.drain()
    assert stored == prompt_block_hashes(list(range(5)), 4)
    # b's copy is not the cached one: when every block is reused, one eviction is noted.
    bm.free(b)
    bm.free(a)
    assert bm.allocate(make_seq(list(range(100, 132))), 32)
    assert bm.events.drain() == ([], stored)


def test_reusing_a_cached_block_reports_its_eviction() -> None:
    bm = BlockManager(num_blocks=2, block_size=4, record_events=True)
    assert bm.events is not None
    first = make_seq(list(range(5)))
    compute_all(bm, first)
    (cached,) = bm.events.drain()[0]
    bm.free(first)
    second = make_seq(list(range(100, 108)))
    compute_all(bm, second)
    stored, evicted = bm.events.drain()
    assert evicted == [cached]
    assert stored == second.block_hashes


def test_only_the_last_change_of_a_hash_counts() -> None:
    log = CacheEventLog()
    log.stored(1)
    log.evicted(1)
    log.evicted(2)
    log.stored(2)
    log.stored(3)
    assert log.drain() == ([2, 3], [1])
    assert log.drain() == ([], [])
