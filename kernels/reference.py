"""Plain torch implementations of the paged-KV operations.

They define what the Triton kernels must compute, and they are the CPU serving
path. Cache layout, shared by every backend:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset_in_block

Query head `h` reads KV head `h // (num_heads // num_kv_heads)` (grouped-query
attention, as in Hugging Face's `repeat_kv`). Math runs in fp32.
"""

from __future__ import annotations

import torch


def store_kv_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 marks a padding token
) -> None:
    """Write each token's K and V into its slot; padding slots are skipped."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(v_cache.dtype)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks_per_seq] int32
    seq_len: int,
) -> torch.Tensor:
    """The first `seq_len` cached tokens of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def _attend(
    query: torch.Tensor,  # [q_len, num_heads, head_dim]
    key: torch.Tensor,  # [kv_len, num_kv_heads, head_dim]
    value: torch.Tensor,  # [kv_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:
    """Causal attention where the queries are the last `q_len` of `kv_len` positions."""
    q_len, num_heads, _ = query.shape
    kv_len, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    q = query.float().transpose(0, 1)  # [H, q_len, D]
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, kv_len, D]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, q_len, kv_len]
    if q_len > 1:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        k_pos = torch.arange(kv_len, device=query.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1).to(query.dtype)  # [q_len, H, D]


def paged_attention_decode_ref(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens, the new one included
    scale: float,
) -> torch.Tensor:
    """Decode attention: each sequence's single query attends to all its cached tokens."""
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        key = gather_kv(k_cache, block_tables[i], seq_len)
        value = gather_kv(v_cache, block_tables[i], seq_len)
        out[i] = _attend(query[i : i + 1], key, value, scale)[0]
    return out


def paged_prefill_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]: sequences packed back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: offsets of each sequence's queries
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached prefix + new tokens
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
) -> torch.Tensor:
    """Causal attention for variable-length query chunks over paged K/V.

    The K/V of the new tokens must already be in the cache. A sequence whose
    `seq_len` exceeds its query count has a cached prefix (prefix-cache hit or an
    earlier prefill chunk); its queries are the last positions of the sequence.
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        key = gather_kv(k_cache, block_tables[i], seq_len)
        value = gather_kv(v_cache, block_tables[i], seq_len)
        out[start:end] = _attend(query[start:end], key, value, scale)
    return out
