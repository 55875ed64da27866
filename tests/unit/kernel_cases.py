"""Shared shapes, inputs and tolerances for the Triton kernel tests.

On CPU the kernels run in Triton's interpreter, which is slow, so the sweeps
are a covering design rather than a cartesian product: every pair of (head
dim, GQA ratio, block size, dtype) values appears in some case. With
`TWOLANE_KERNEL_DEVICE=cuda` the kernels run natively and the sweep widens to
every (GQA ratio, block size, dtype) triple, with more heads and longer sequences.

Import this module before anything imports triton: it turns the interpreter on
for CPU runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEVICE = os.environ.get("TWOLANE_KERNEL_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
FULL_SWEEP = DEVICE != "cpu"

import torch  # noqa: E402

HEAD_DIMS = (64, 128)
QUERY_GROUPS = (1, 4, 8)
BLOCK_SIZES = (8, 16, 32)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@dataclass(frozen=True)
class KernelCase:
    head_dim: int
    query_group: int  # query heads per KV head
    block_size: int
    dtype: torch.dtype
    num_kv_heads: int = 2

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.query_group

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"d{self.head_dim}-g{self.query_group}-kv{self.num_kv_heads}"
            f"-bs{self.block_size}-{dtype}"
        )


# Every pair of (head dim, GQA ratio, block size, dtype) values appears in some
# row: a 3x3 Latin square over the last three, with head dims placed to meet
# every value of the others.
_PAIRWISE_CASES = (
    KernelCase(64, 1, 8, torch.float32),
    KernelCase(64, 1, 16, torch.float16),
    KernelCase(128, 1, 32, torch.bfloat16),
    KernelCase(128, 4, 8, torch.float16),
    KernelCase(64, 4, 16, torch.bfloat16),
    KernelCase(64, 4, 32, torch.float32),
    KernelCase(64, 8, 8, torch.bfloat16),
    KernelCase(128, 8, 16, torch.float32),
    KernelCase(64, 8, 32, torch.float16),
)


def kernel_cases() -> list[KernelCase]:
    if FULL_SWEEP:
        # Every (GQA ratio, block size, dtype) triple, each pair of them with both
        # head dims. Not the full product: each case compiles several kernels.
        return [
            KernelCase(HEAD_DIMS[(i + j + k) % 2], group, block_size, dtype, num_kv_heads=4)
            for i, group in enumerate(QUERY_GROUPS)
            for j, block_size in enumerate(BLOCK_SIZES)
            for k, dtype in enumerate(DTYPES)
        ]
    return list(_PAIRWISE_CASES)


def make_cache(
    case: KernelCase, num_blocks: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K and V caches: [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    k_cache = torch.randn(shape, generator=generator).to(DEVICE, case.dtype)
    v_cache = torch.randn(shape, generator=generator).to(DEVICE, case.dtype)
    return k_cache, v_cache


def make_block_tables(
    seq_lens: list[int], block_size: int, num_blocks: int, generator: torch.Generator
) -> torch.Tensor:
    """Disjoint, shuffled blocks per sequence, padded with 0: [num_seqs, max_blocks] int32."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(max(blocks_per_seq), 1)
    if sum(blocks_per_seq) > num_blocks:
        raise ValueError(f"{sum(blocks_per_seq)} blocks needed, cache has {num_blocks}")
    free = torch.randperm(num_blocks, generator=generator).tolist()
    table = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = torch.tensor(free[:n], dtype=torch.int32)
        free = free[n:]
    return table.to(DEVICE)


def num_blocks_for(seq_lens: list[int], block_size: int) -> int:
    """Enough blocks for every sequence plus some never read."""
    return sum((n + block_size - 1) // block_size for n in seq_lens) + 3


def ragged_lens(block_size: int) -> list[int]:
    """Context lengths: 1, exact multiples of the block size and non-multiples."""
    return [1, block_size, 2 * block_size + 3, 3 * block_size, 4 * block_size - 1]


def poisoned_like(tensor: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so that any element the kernel misses fails the test."""
    return torch.full_like(tensor, float("nan"))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
