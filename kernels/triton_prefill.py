"""Triton prefill attention over the paged KV cache.

Matches `paged_prefill_attention_ref`: sequences are packed back to back
(`query_start_loc`), and a sequence may already have a cached prefix
(`seq_len > query_len`, after a prefix-cache hit or an earlier prefill chunk),
in which case its queries are the last `query_len` positions. The new tokens'
K/V must already be in the cache.

One program handles `BLOCK_M` queries of one sequence for one query head. It
walks the sequence's block table in tiles of `BLOCK_N` tokens up to the causal
limit of its last query, with an online softmax in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twolane.kernels.triton_decode import (
    check_paged_inputs,
    dot_in_fp32,
    dot_precision,
    load_kv_tile,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    scale_log2,  # softmax scale times log2(e): scores are kept in base 2
    query_stride_token,
    query_stride_head,
    out_stride_token,
    out_stride_head,
    cache_stride_block,
    cache_stride_offset,
    cache_stride_head,
    block_tables_stride_seq,
    QUERY_GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # see `triton_decode.dot_in_fp32`
):
    seq = tl.program_id(0).to(tl.int64)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // QUERY_GROUP

    query_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    query_len = (tl.load(query_start_loc_ptr + seq + 1) - query_start).to(tl.int32)
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - query_len

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    row_mask = rows < query_len
    positions = prefix_len + rows  # each query's position in the sequence
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_mask = dims < HEAD_DIM
    q_mask = row_mask[:, None] & dim_mask[None, :]

    tokens = query_start + rows
    query = tl.load(
        query_ptr + tokens[:, None] * query_stride_token + head * query_stride_head + dims[None, :],
        mask=q_mask,
        other=0.0,
    )
    if DOT_IN_FP32:
        query = query.to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], tl.float32)

    block_table_ptr = block_tables_ptr + seq * block_tables_stride_seq
    # Keys past the last query of this tile are masked for every row. Programs
    # whose tile holds no query skip the loop (query_len <= m_block * BLOCK_M).
    kv_end = tl.minimum(seq_len, prefix_len + (m_block + 1) * BLOCK_M)
    kv_end = tl.where(m_block * BLOCK_M < query_len, kv_end, 0)
    # Key 0 is visible to every row, so the running max is finite after the first tile.
    for tile_start in range(0, kv_end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        key_mask = keys < seq_len
        key, value = load_kv_tile(  # [BLOCK_N, D] each
            k_cache_ptr,
            v_cache_ptr,
            block_table_ptr,
            keys,
            key_mask,
            kv_head,
            dims,
            dim_mask,
            cache_stride_block,
            cache_stride_offset,
            cache_stride_head,
            BLOCK_SIZE,
            DOT_IN_FP32,
        )

        scores = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION) * scale_log2
        visible = key_mask[None, :] & (keys[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(
            probs.to(value.dtype), value, input_precision=DOT_PRECISION
        )
        running_max = new_max

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(
        out_ptr + tokens[:, None] * out_stride_token + head * out_stride_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]: sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached prefix + new tokens
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:
    """Causal varlen attention over paged K/V; see `paged_prefill_attention_ref`.

    Args:
        max_query_len: the most queries of any sequence; read from
            `query_start_loc` (a device sync) when not given. It sizes the grid.
        out: where to write the result; a new tensor when None.

    Returns:
        The attention output, [num_tokens, num_heads, head_dim] in the query's dtype.
        Tokens outside every sequence's query range are left unwritten.
    """
    check_paged_inputs(query, k_cache, v_cache, block_tables)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if seq_lens.dtype != torch.int32 or query_start_loc.dtype != torch.int32:
        raise ValueError("seq_lens and query_start_loc must be int32")
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} and block_tables "
            f"{tuple(block_tables.shape)} do not match {num_seqs} sequences"
        )
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.stride(2) != 1:
        raise ValueError(f"out {tuple(out.shape)} must match query and be contiguous in head_dim")
    if num_seqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if max_query_len <= 0:
        return out

    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    block_m, block_n = _tile_sizes(query, head_dim_p2, max_query_len)
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](
        out,
        query,
        k_cache,
        v_cache,
        query_start_loc,
        seq_lens,
        block_tables,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        QUERY_GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        DOT_IN_FP32=dot_in_fp32(_prefill_kernel, query.dtype),
    )
    return out


def _tile_sizes(query: torch.Tensor, head_dim_p2: int, max_query_len: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): small tiles for short chunks, and less shared memory for fp32."""
    block_m = 64 if max_query_len > 32 else 16
    block_n = 64 if head_dim_p2 <= 64 or query.element_size() == 2 else 32
    return block_m, block_n
