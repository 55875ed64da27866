"""The Triton paged-attention decode matches `paged_attention_decode_ref`."""

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
    ragged_lens,
)

pytest.importorskip("triton")

from twolane.kernels.reference import paged_attention_decode_ref
from twolane.kernels.triton_decode import (
    DEFAULT_PARTITION_SIZE,
    num_decode_partitions,
    paged_attention_decode,
)

CASES = kernel_cases()


def _check_decode(
    case: KernelCase,
    seq_lens: list[int],
    partition_size: int | None,
    seed: int = 0,
    query: torch.Tensor | None = None,
) -> None:
    gen = generator(seed)
    num_blocks = num_blocks_for(seq_lens, case.block_size)
    k_cache, v_cache = make_cache(case, num_blocks, gen)
    block_tables = make_block_tables(seq_lens, case.block_size, num_blocks, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    if query is None:
        shape = (len(seq_lens), case.num_heads, case.head_dim)
        query = torch.randn(shape, generator=gen).to(DEVICE, case.dtype)
    scale = case.head_dim**-0.5
    expected = paged_attention_decode_ref(query, k_cache, v_cache, block_tables, lens, scale)
    out = poisoned_like(query)
    paged_attention_decode(
        query,
        k_cache,
        v_cache,
        block_tables,
        lens,
        scale,
        max_seq_len=max(seq_lens),
        partition_size=partition_size,
        out=out,
    )
    torch.testing.assert_close(out, expected, **TOLERANCES[case.dtype])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_matches_reference_on_ragged_contexts(case: KernelCase) -> None:
    _check_decode(case, ragged_lens(case.block_size), partition_size=None)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_split_across_partitions_matches_reference(case: KernelCase) -> None:
    # Partitions of 32 tokens: short contexts stay in one partition, longer ones
    # split, and ones shorter than the longest leave trailing partitions empty.
    seq_lens = [*ragged_lens(case.block_size), 5 * case.block_size + 7]
    _check_decode(case, seq_lens, partition_size=32, seed=1)


@pytest.mark.parametrize(
    "case",
    [KernelCase(128, 8, 16, torch.bfloat16), KernelCase(64, 1, 32, torch.float32)],
    ids=lambda c: c.id,
)
def test_decode_long_context_takes_the_split_path(case: KernelCase) -> None:
    seq_lens = [3 * DEFAULT_PARTITION_SIZE + 17, 1, DEFAULT_PARTITION_SIZE]
    if FULL_SWEEP:
        seq_lens += [16 * DEFAULT_PARTITION_SIZE - 1, 700]
    assert num_decode_partitions(len(seq_lens), case.num_kv_heads, max(seq_lens), None)[1] > 1
    _check_decode(case, seq_lens, partition_size=None, seed=2)


def test_decode_reads_a_strided_query() -> None:
    # The query arrives as a view into the fused QKV projection.
    case = KernelCase(64, 4, 16, torch.float16)
    seq_lens = [9, 33, 16]
    gen = generator(3)
    width = case.num_heads * case.head_dim
    qkv = torch.randn((len(seq_lens), 2 * width), generator=gen).to(DEVICE, case.dtype)
    query = qkv[:, :width].view(len(seq_lens), case.num_heads, case.head_dim)
    assert not query.is_contiguous()
    _check_decode(case, seq_lens, partition_size=16, query=query)


def test_decode_masks_a_head_dim_that_is_not_a_power_of_two() -> None:
    case = KernelCase(96, 2, 16, torch.float16)
    _check_decode(case, [1, 40, 16], partition_size=None, seed=4)


@settings(max_examples=8 if DEVICE == "cpu" else 50, deadline=None)
@given(
    case=st.sampled_from(CASES),
    seq_lens=st.lists(st.integers(1, 150), min_size=1, max_size=4),
    partition_size=st.sampled_from([None, 16, 64]),
)
def test_decode_matches_reference_on_random_batches(
    case: KernelCase, seq_lens: list[int], partition_size: int | None
) -> None:
    _check_decode(case, seq_lens, partition_size, seed=5)


def test_large_batches_run_each_context_in_one_partition() -> None:
    partition_size, num_partitions = num_decode_partitions(256, 8, 5000, None)
    assert num_partitions == 1
    assert partition_size >= 5000


def test_small_batches_split_long_contexts() -> None:
    assert num_decode_partitions(2, 8, 5000, None) == (DEFAULT_PARTITION_SIZE, 10)


def test_decode_rejects_mismatched_dtypes() -> None:
    query = torch.zeros((1, 2, 64), dtype=torch.float16, device=DEVICE)
    cache = torch.zeros((2, 16, 2, 64), dtype=torch.float32, device=DEVICE)
    tables = torch.zeros((1, 2), dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="share one of"):
        paged_attention_decode(query, cache, cache, tables, lens, 1.0)


def test_decode_rejects_a_partition_size_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        num_decode_partitions(1, 1, 100, 48)
