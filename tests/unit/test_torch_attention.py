"""The CPU serving attention equals the torch reference on mixed steps."""

from __future__ import annotations

import pytest
import torch

from twolane.kernels.reference import paged_prefill_attention_ref
from twolane.kernels.torch_attention import paged_attention_torch, plan_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_step_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, block_size: int
) -> None:
    gen = torch.Generator().manual_seed(num_heads * 31 + block_size)
    head_dim, num_blocks = 32, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    # (queries this step, context length): decodes, a fresh prefill, a chunk after a prefix.
    shapes = [
        (1, 1),
        (1, block_size),
        (1, 3 * block_size + 1),
        (5, 5),
        (1, 2),
        (7, 2 * block_size + 3),
        (1, 7 * block_size + 2),
        (1, 3 * block_size),
    ]
    query_lens = torch.tensor([q for q, _ in shapes])
    seq_lens = torch.tensor([s for _, s in shapes], dtype=torch.int32)
    query_start_loc = torch.cat([torch.zeros(1), query_lens.cumsum(0)]).int()
    block_tables = torch.randperm(num_blocks, generator=gen)[: 8 * 8].view(8, 8).int()
    query = torch.randn(int(query_lens.sum()), num_heads, head_dim, generator=gen).to(dtype)

    plan = plan_step(query_start_loc, seq_lens, block_tables, block_size)
    got = paged_attention_torch(query, k_cache, v_cache, plan, 0.17)
    want = paged_prefill_attention_ref(
        query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, 0.17
    )
    # Decodes of lengths 1 to 7 blocks cannot share one bucket: several buckets ran.
    assert len(plan.decodes) > 1 and len(plan.prefills) == 2
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
