"""Torch attention over the paged cache: the CPU serving path.

One loop over the step's sequences, each doing a handful of ops. It beats padding
the batch to the longest context (ragged contexts waste most of a padded batch) and
the reference (which copies K/V once per query head): query heads of a group share
one view of their KV head, and the cache is read through an index over whole blocks.
Everything runs in fp32, whatever the cache dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequencePlan:
    """Where one sequence's queries and context are; computed once per step, used by every layer."""

    start: int
    end: int
    seq_len: int
    blocks: torch.Tensor  # the sequence's blocks covering seq_len tokens, int64


def plan_sequences(
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens, this step's included
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    block_size: int,
) -> list[SequencePlan]:
    starts = query_start_loc.tolist()
    tables = block_tables.long()
    return [
        SequencePlan(starts[i], starts[i + 1], seq_len, tables[i, : -(-seq_len // block_size)])
        for i, seq_len in enumerate(seq_lens.tolist())
        if starts[i + 1] > starts[i]
    ]


def paged_attention_torch(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plans: list[SequencePlan],
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention for every sequence of a step, decodes and prefill chunks alike."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query)
    # CPU products on strided 16-bit operands are several times slower than upcasting
    # them first, so attention runs in fp32 whatever the cache dtype.
    query32 = query.float()
    for plan in plans:
        key = k_cache.index_select(0, plan.blocks).view(-1, num_kv_heads, head_dim)
        value = v_cache.index_select(0, plan.blocks).view(-1, num_kv_heads, head_dim)
        out[plan.start : plan.end] = _attend(
            query32[plan.start : plan.end],
            key[: plan.seq_len].float(),
            value[: plan.seq_len].float(),
            group,
            scale,
        )
    return out


def _attend(
    query: torch.Tensor,  # [q_len, num_heads, head_dim]: the last q_len positions
    key: torch.Tensor,  # [kv_len, num_kv_heads, head_dim]
    value: torch.Tensor,
    group: int,
    scale: float,
) -> torch.Tensor:
    q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads, _ = key.shape
    # Fold the query heads of a group into the rows of one product per KV head:
    # [num_kv_heads, group * q_len, head_dim] x [num_kv_heads, head_dim, kv_len].
    q = query.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(num_kv_heads, group * q_len, head_dim)
    scores = torch.bmm(q, key.permute(1, 2, 0)) * scale
    if q_len > 1:
        scores = scores.view(num_kv_heads, group, q_len, kv_len)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        k_pos = torch.arange(kv_len, device=query.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        scores = scores.view(num_kv_heads, group * q_len, kv_len)
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, value.transpose(0, 1))  # [num_kv_heads, group * q_len, head_dim]
    return (
        out.view(num_kv_heads, group, q_len, head_dim)
        .permute(2, 0, 1, 3)
        .reshape(q_len, num_heads, head_dim)
    )
