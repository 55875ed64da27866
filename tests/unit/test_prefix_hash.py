"""Block hashes are one definition, stable across processes, shared by engine and gateway."""

from __future__ import annotations

import os
import subprocess
import sys

from twolane.scheduler.block_manager import BlockManager
from twolane.scheduler.prefix_hash import chain_hash, num_cacheable_blocks, prompt_block_hashes
from twolane.scheduler.request import Priority, SamplingParams
from twolane.scheduler.sequence import Sequence

# BLAKE2b-64 of the packed ids: any change of the definition changes these, and every
# worker and gateway of a fleet must agree on them.
FIRST = 15195315728730727403
SECOND = 15903411287830608657


def test_chain_hash_has_fixed_values() -> None:
    assert chain_hash(None, (1, 2, 3, 4)) == FIRST
    assert chain_hash(FIRST, (5, 6, 7, 8)) == SECOND
    assert chain_hash(None, [1, 2, 3, 4]) == FIRST  # a list hashes like a tuple


def test_chain_hash_depends_on_the_parent_and_the_order_of_tokens() -> None:
    assert chain_hash(None, (5, 6, 7, 8)) != SECOND
    assert chain_hash(FIRST, (8, 7, 6, 5)) != SECOND
    assert 0 <= FIRST < 2**64


def test_chain_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from twolane.scheduler.prefix_hash import chain_hash; "
        "print(chain_hash(chain_hash(None, (1, 2, 3, 4)), (5, 6, 7, 8)))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert int(out.stdout) == SECOND


def test_the_last_token_of_a_prompt_is_never_in_a_cacheable_block() -> None:
    assert num_cacheable_blocks(33, 16) == 2
    assert num_cacheable_blocks(32, 16) == 1
    assert num_cacheable_blocks(1, 16) == 0
    assert prompt_block_hashes(list(range(1, 10)), 4) == [FIRST, SECOND]
    assert prompt_block_hashes([1, 2, 3, 4], 4) == []


def test_the_block_manager_caches_blocks_under_the_shared_hashes() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(1, 10))
    seq = Sequence("s", tokens, SamplingParams(), Priority.INTERACTIVE, 0, 0.0)
    assert bm.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    bm.commit_full_blocks(seq)
    assert seq.block_hashes == [FIRST, SECOND]
    assert set(bm.cached_blocks) == {FIRST, SECOND}
