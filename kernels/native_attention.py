"""CPU attention on the native op: decodes read the paged cache in place.

A step's plan is made once and used by every layer. Its decoding sequences (one query
each) go to the native op in one call, which walks their block tables where the blocks
are; its prefill chunks go one by one through torch's flash SDPA
(`torch_attention.prefill_attention`), on the step's own K/V when the chunk has no
cached prefix. The step's K/V are stored by the native op too: one call per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twolane.kernels.native import NativeOps
from twolane.kernels.torch_attention import PrefillPlan, prefill_attention


@dataclass(frozen=True)
class DecodeRows:
    """The step's decoding sequences, as the native op takes them."""

    rows: torch.Tensor  # [n] int32: each sequence's query row in the step
    block_tables: torch.Tensor  # [n, max_blocks] int32
    seq_lens: torch.Tensor  # [n] int32


@dataclass(frozen=True)
class NativePlan:
    decodes: DecodeRows | None
    prefills: list[PrefillPlan]


def plan_native_step(
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens, this step's included
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int,
    block_size: int,
) -> NativePlan:
    starts = query_start_loc[:-1]
    if max_query_len == 1:  # decodes only: the metadata is the plan, no Python per sequence
        return NativePlan(DecodeRows(starts, block_tables, seq_lens), [])
    query_lens = query_start_loc[1:] - starts
    decoding = query_lens == 1
    decodes = None
    if bool(decoding.any()):
        decodes = DecodeRows(
            starts[decoding].contiguous(),
            block_tables[decoding].contiguous(),
            seq_lens[decoding].contiguous(),
        )
    prefills = []
    tables = block_tables.long()
    bounds, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i in (query_lens > 1).nonzero().flatten().tolist():
        blocks = tables[i, : -(-lens[i] // block_size)]
        prefills.append(PrefillPlan(bounds[i], bounds[i + 1], lens[i], blocks))
    return NativePlan(decodes, prefills)


def paged_attention_native(
    ops: NativeOps,
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]: this step's, already stored
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: NativePlan,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention for every sequence of a step, decodes and prefill chunks alike."""
    out = torch.empty_like(query)
    if plan.decodes is not None:
        d = plan.decodes
        ops.paged_decode(out, query, k_cache, v_cache, d.block_tables, d.seq_lens, d.rows, scale)
    for p in plan.prefills:
        out[p.start : p.end] = prefill_attention(query, k_cache, v_cache, p, scale, key, value)
    return out
