"""Property test: random interleavings of block-manager operations never leak or double-free."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from twolane.scheduler.block_manager import BlockManager
from twolane.scheduler.request import Priority, SamplingParams
from twolane.scheduler.sequence import Sequence

NUM_BLOCKS = 12
BLOCK_SIZE = 4
_ids = itertools.count()


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.live: list[Sequence] = []

    # Prompts come from a small alphabet so that prefixes are often shared.
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20))
    def allocate(self, tokens: list[int]) -> None:
        seq = Sequence(f"s{next(_ids)}", tokens, SamplingParams(), Priority.BULK, next(_ids), 0.0)
        prefix = self.bm.match_prefix(seq)
        num_new = seq.num_tokens - prefix.num_tokens
        free_before = self.bm.num_free_blocks
        if self.bm.allocate(seq, num_new, prefix) is None:
            assert self.bm.num_free_blocks == free_before
            assert seq.block_table == []
            return
        seq.num_computed_tokens = seq.num_tokens
        self.bm.commit_full_blocks(seq)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data: st.DataObject, token: int) -> None:
        seq = data.draw(st.sampled_from(self.live))
        seq.token_ids.append(token)
        if self.bm.allocate(seq, 1) is None:
            seq.token_ids.pop()
            return
        seq.num_computed_tokens += 1
        self.bm.commit_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort_mid_prefill(self, data: st.DataObject) -> None:
        """Abort right after allocating, before anything was computed."""
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        seq.num_computed_tokens = 0
        self.bm.free(seq)

    @invariant()
    def free_plus_used_is_total(self) -> None:
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == NUM_BLOCKS

    @invariant()
    def ref_counts_match_live_block_tables(self) -> None:
        expected = [0] * NUM_BLOCKS
        for seq in self.live:
            for block_id in seq.block_table:
                expected[block_id] += 1
        assert [b.ref_count for b in self.bm.blocks] == expected
        self.bm.check_invariants()

    @invariant()
    def live_sequences_have_room_for_their_tokens(self) -> None:
        for seq in self.live:
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed_tokens

    def teardown(self) -> None:
        for seq in self.live:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
