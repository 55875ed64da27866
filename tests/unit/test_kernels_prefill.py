"""The Triton prefill attention over paged K/V matches `paged_prefill_attention_ref`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import (
    DEVICE,
    FULL_SWEEP,
    TOLERANCES,
    KernelCase,
    generator,
    kernel_cases,
    make_block_tables,
    make_cache,
    num_blocks_for,
    poisoned_like,
)

pytest.importorskip("triton")

from twolane.kernels.reference import paged_prefill_attention_ref
from twolane.kernels.triton_prefill import paged_prefill_attention

CASES = kernel_cases()


def _check_prefill(
    case: KernelCase, query_lens: list[int], prefix_lens: list[int], seed: int = 0
) -> None:
    gen = generator(seed)
    seq_lens = [q + p for q, p in zip(query_lens, prefix_lens, strict=True)]
    num_blocks = num_blocks_for(seq_lens, case.block_size)
    k_cache, v_cache = make_cache(case, num_blocks, gen)
    block_tables = make_block_tables(seq_lens, case.block_size, num_blocks, gen)
    starts = torch.tensor([0, *query_lens]).cumsum(0)
    query_start_loc = starts.to(DEVICE, torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    shape = (sum(query_lens), case.num_heads, case.head_dim)
    query = torch.randn(shape, generator=gen).to(DEVICE, case.dtype)
    scale = case.head_dim**-0.5
    expected = paged_prefill_attention_ref(
        query, k_cache, v_cache, query_start_loc, lens, block_tables, scale
    )
    out = poisoned_like(query)
    paged_prefill_attention(
        query,
        k_cache,
        v_cache,
        query_start_loc,
        lens,
        block_tables,
        scale,
        max_query_len=max(query_lens),
        out=out,
    )
    torch.testing.assert_close(out, expected, **TOLERANCES[case.dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_prefill_without_cached_prefix_matches_reference(case: KernelCase) -> None:
    bs = case.block_size
    query_lens = [1, bs, 2 * bs + 5, 3]
    if FULL_SWEEP:
        query_lens += [37, 200]
    _check_prefill(case, query_lens, [0] * len(query_lens))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_prefill_after_cached_prefix_matches_reference(case: KernelCase) -> None:
    bs = case.block_size
    # A prefix-cache hit on whole blocks, a chunked prefill resuming mid-block,
    # and a decode token riding in the same step.
    query_lens = [bs + 3, 7, 1, bs]
    prefix_lens = [2 * bs, bs + 5, 3 * bs - 1, 1]
    if FULL_SWEEP:
        query_lens += [100, 64]
        prefix_lens += [300, 64]
    _check_prefill(case, query_lens, prefix_lens, seed=1)


@pytest.mark.parametrize(
    "case",
    [KernelCase(64, 4, 16, torch.bfloat16), KernelCase(128, 1, 32, torch.float32)],
    ids=lambda c: c.id,
)
def test_prefill_of_long_chunks_spans_several_query_tiles(case: KernelCase) -> None:
    # Over 32 queries the kernel takes 64-row query tiles; 130 needs three of them.
    _check_prefill(case, [130, 40], [0, 45], seed=2)


def test_prefill_masks_a_head_dim_that_is_not_a_power_of_two() -> None:
    case = KernelCase(96, 2, 16, torch.bfloat16)
    _check_prefill(case, [20, 3], [0, 18], seed=4)


@settings(max_examples=8 if DEVICE == "cpu" else 50, deadline=None)
@given(
    case=st.sampled_from(CASES),
    lens=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 80)), min_size=1, max_size=3),
)
def test_prefill_matches_reference_on_random_batches(
    case: KernelCase, lens: list[tuple[int, int]]
) -> None:
    query_lens, prefix_lens = (list(x) for x in zip(*lens, strict=True))
    _check_prefill(case, query_lens, prefix_lens, seed=5)


def test_prefill_skips_sequences_without_queries() -> None:
    case = KernelCase(64, 1, 16, torch.float32)
    _check_prefill(case, [5, 0, 3], [0, 20, 4], seed=3)


def test_prefill_rejects_query_start_loc_of_the_wrong_length() -> None:
    query = torch.zeros((4, 2, 64), device=DEVICE)
    cache = torch.zeros((2, 16, 2, 64), device=DEVICE)
    tables = torch.zeros((1, 2), dtype=torch.int32, device=DEVICE)
    lens = torch.full((1,), 4, dtype=torch.int32, device=DEVICE)
    loc = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        paged_prefill_attention(query, cache, cache, loc, lens, tables, 1.0)
