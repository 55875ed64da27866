"""Batched torch attention over the paged cache: the CPU serving path.

The references in `reference.py` loop over sequences, which is clear but costs a
dozen small ops per sequence per layer. Here all decoding sequences of a step share
one gather and one masked attention, so a decode step's attention is a fixed number
of ops whatever the batch size.
"""

from __future__ import annotations

import torch

from twolane.kernels.reference import paged_prefill_attention_ref


def paged_attention_decode_batched(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_blocks = -(-int(seq_lens.max()) // block_size)
    tables = block_tables[:, :num_blocks].long()
    max_len = num_blocks * block_size
    # [num_seqs, num_kv_heads, max_len, head_dim]
    keys = k_cache[tables].reshape(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[tables].reshape(num_seqs, max_len, num_kv_heads, head_dim).transpose(1, 2)
    q = query.reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(q.float(), keys.float().transpose(2, 3)) * scale
    positions = torch.arange(max_len, device=query.device)
    padding = positions[None, :] >= seq_lens[:, None]  # [num_seqs, max_len]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.float())  # [num_seqs, num_kv_heads, group, head_dim]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def paged_attention_mixed(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
) -> torch.Tensor:
    """A step mixing decodes and prefill chunks: decodes batched, prefill chunks one by one."""
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    decoding = torch.nonzero(query_lens == 1).flatten()
    out = torch.empty_like(query)
    if decoding.numel():
        rows = query_start_loc[decoding].long()
        out[rows] = paged_attention_decode_batched(
            query[rows], k_cache, v_cache, block_tables[decoding], seq_lens[decoding], scale
        )
    starts = query_start_loc.tolist()
    for i in torch.nonzero(query_lens > 1).flatten().tolist():
        start, end = starts[i], starts[i + 1]
        out[start:end] = paged_prefill_attention_ref(
            query[start:end],
            k_cache,
            v_cache,
            query_start_loc.new_tensor([0, end - start]),
            seq_lens[i : i + 1],
            block_tables[i : i + 1],
            scale,
        )
    return out
