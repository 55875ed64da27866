"""Block manager: allocation, ref counts, prefix cache, eviction order, free."""

from __future__ import annotations

import itertools

import pytest

from twolane.scheduler.block_manager import BlockManager, PrefixMatch
from twolane.scheduler.request import Priority, SamplingParams
from twolane.scheduler.sequence import Sequence

_ids = itertools.count()


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence(
        f"s{next(_ids)}", token_ids, SamplingParams(), Priority.STANDARD, next(_ids), 0.0
    )


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and mark every token computed, as an engine step would."""
    prefix = bm.match_prefix(seq)
    assert bm.allocate(
        seq, seq.num_tokens - max(prefix.num_tokens, seq.num_computed_tokens), prefix
    )
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_full_blocks(seq)


def test_allocate_takes_blocks_in_free_list_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    alloc = bm.allocate(seq, 10)
    assert alloc is not None
    assert alloc.new_block_ids == (0, 1, 2)
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert list(bm.free_blocks) == [3, 4, 5, 6, 7]


def test_allocate_returns_none_and_changes_nothing_without_room() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(9)))
    assert bm.allocate(seq, 9) is None
    assert seq.block_table == []
    assert bm.num_free_blocks == 2


def test_append_adds_a_block_only_when_the_last_one_is_full() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq([1, 2, 3])
    assert bm.allocate(seq, 3)
    seq.num_computed_tokens = 3
    seq.token_ids.append(4)
    assert bm.allocate(seq, 1).new_block_ids == ()
    seq.num_computed_tokens = 4
    seq.token_ids.append(5)
    assert bm.allocate(seq, 1).new_block_ids == (1,)


def test_prefix_hit_reuses_full_blocks_and_counts_the_hit() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(10)))
    compute_all(bm, first)
    second = make_seq([*range(8), 99, 98, 97])
    prefix = bm.match_prefix(second)
    assert prefix == PrefixMatch(block_ids=(0, 1), num_tokens=8)
    alloc = bm.allocate(second, 3, prefix)
    assert alloc is not None
    assert second.block_table[:2] == [0, 1]
    assert second.num_computed_tokens == 8
    assert bm.blocks[0].ref_count == 2
    assert bm.num_prefix_hit_tokens == 8


def test_prefix_match_leaves_the_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    compute_all(bm, make_seq(list(range(8))))
    again = make_seq(list(range(8)))
    assert bm.match_prefix(again).num_tokens == 4


def test_prefix_match_compares_tokens_not_only_hashes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(9)))
    compute_all(bm, seq)
    block_hash = seq.block_hashes[0]
    # Simulate a hash collision: the cached block under this hash holds other tokens.
    bm.blocks[bm.cached_blocks[block_hash]].token_ids = (7, 7, 7, 7)
    assert bm.match_prefix(make_seq(list(range(9)))).num_tokens == 0


def test_freed_cached_blocks_are_evicted_least_recently_used_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(list(range(8)))  # blocks 0, 1 (full, cached)
    b = make_seq(list(range(100, 108)))  # blocks 2, 3
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)
    bm.free(b)
    # Unhashed blocks first, then a's blocks (freed first), each sequence's tail first.
    assert list(bm.free_blocks) == [4, 5, 1, 0, 3, 2]
    c = make_seq(list(range(200, 212)))
    assert bm.allocate(c, 12).new_block_ids == (4, 5, 1)
    # Block 1 was evicted: a's first block still hits, its second no longer does.
    assert bm.match_prefix(make_seq(list(range(9)))).num_tokens == 4


def test_hit_on_a_free_cached_block_removes_it_from_the_free_list() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(5)))
    compute_all(bm, a)
    bm.free(a)
    b = make_seq(list(range(6)))
    prefix = bm.match_prefix(b)
    assert prefix.block_ids == (0,)
    assert bm.allocate(b, 2, prefix)
    assert 0 not in bm.free_blocks
    bm.check_invariants()


def test_double_free_is_caught() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq([1, 2])
    assert bm.allocate(seq, 2)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(AssertionError, match="double free"):
        bm.free(seq)


def test_allocate_rejects_non_positive_token_counts() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    with pytest.raises(ValueError):
        bm.allocate(make_seq([1]), 0)
