"""Triton paged-attention decode: one new query token per sequence over its paged K/V.

Matches `paged_attention_decode_ref`. One program handles one (sequence, KV
head, context partition): it reads the KV head's tokens once for every query
head of the group (grouped-query attention), walking the block table in tiles
of `TILE_N` tokens that may span several cache blocks, with an online softmax
in fp32.

Long contexts are split across programs ("flash-decoding"): each partition of
`partition_size` tokens writes its unnormalised output with its running max
and sum of exponentials, and a second kernel merges the partitions with a
log-sum-exp reduction. With a single partition the first kernel writes the
output directly and the second never runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_PARTITION_SIZE = 512
# Below this many (sequence, KV head) programs the GPU is underfilled, so long
# contexts are split across programs; above it one program per pair is enough.
_SPLIT_BELOW_NUM_PROGRAMS = 256
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@triton.jit
def load_kv_tile(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    block_table_ptr,  # this sequence's row of the block table
    tokens,  # [N] token positions in the sequence
    token_mask,  # [N] positions that exist
    kv_head,
    dims,  # [D] 0..head_dim_p2
    dim_mask,  # [D] dims < head_dim
    cache_stride_block,
    cache_stride_offset,
    cache_stride_head,
    BLOCK_SIZE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Load one KV head's K and V for `tokens` through the block table: [N, D] each."""
    blocks = tl.load(block_table_ptr + tokens // BLOCK_SIZE, mask=token_mask, other=0)
    kv_offsets = (
        blocks.to(tl.int64)[:, None] * cache_stride_block
        + (tokens % BLOCK_SIZE)[:, None] * cache_stride_offset
        + kv_head * cache_stride_head
        + dims[None, :]
    )
    kv_mask = token_mask[:, None] & dim_mask[None, :]
    key = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    value = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    if DOT_IN_FP32:
        key = key.to(tl.float32)
        value = value.to(tl.float32)
    return key, value


@triton.jit
def _decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]; written unless SPLIT
    part_acc_ptr,  # [num_seqs, num_heads, num_partitions, HEAD_DIM_P2] fp32; written if SPLIT
    part_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32, log2 domain
    part_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    query_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    scale_log2,  # softmax scale times log2(e): scores are kept in base 2
    query_stride_seq,
    query_stride_head,
    out_stride_seq,
    out_stride_head,
    cache_stride_block,
    cache_stride_offset,
    cache_stride_head,
    block_tables_stride_seq,
    partition_size,  # tokens per partition, a multiple of TILE_N
    num_partitions,
    QUERY_GROUP: tl.constexpr,  # query heads per KV head
    QUERY_GROUP_P2: tl.constexpr,  # padded to at least 16 rows for tl.dot
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    SPLIT: tl.constexpr,  # write per-partition results for the merge kernel
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # see `dot_in_fp32`
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)

    rows = tl.arange(0, QUERY_GROUP_P2)  # query heads of this group
    dims = tl.arange(0, HEAD_DIM_P2)
    row_mask = rows < QUERY_GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * QUERY_GROUP + rows

    query = tl.load(
        query_ptr + seq * query_stride_seq + heads[:, None] * query_stride_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    if DOT_IN_FP32:
        query = query.to(tl.float32)

    running_max = tl.full([QUERY_GROUP_P2], float("-inf"), tl.float32)
    running_sum = tl.zeros([QUERY_GROUP_P2], tl.float32)
    acc = tl.zeros([QUERY_GROUP_P2, HEAD_DIM_P2], tl.float32)

    block_table_ptr = block_tables_ptr + seq * block_tables_stride_seq
    start = partition * partition_size
    end = tl.minimum(start + partition_size, seq_len)
    # Each tile starts below seq_len, so it holds at least one real token and the
    # running max is finite after the first tile.
    for tile_start in range(start, end, TILE_N):
        tokens = tile_start + tl.arange(0, TILE_N)
        token_mask = tokens < seq_len
        key, value = load_kv_tile(  # [TILE_N, D] each
            k_cache_ptr,
            v_cache_ptr,
            block_table_ptr,
            tokens,
            token_mask,
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
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(
            probs.to(value.dtype), value, input_precision=DOT_PRECISION
        )
        running_max = new_max

    if not SPLIT:
        # An empty context (seq_len 0) attends to nothing and yields zeros, as the reference.
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(
            out_ptr + seq * out_stride_seq + heads[:, None] * out_stride_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & dim_mask[None, :],
        )
    else:
        stat_offsets = (seq * (QUERY_GROUP * tl.num_programs(1)) + heads) * num_partitions
        stat_offsets += partition
        tl.store(part_max_ptr + stat_offsets, running_max, mask=row_mask)
        tl.store(part_sum_ptr + stat_offsets, running_sum, mask=row_mask)
        tl.store(
            part_acc_ptr + stat_offsets[:, None] * HEAD_DIM_P2 + dims[None, :],
            acc,
            mask=row_mask[:, None] & dim_mask[None, :],
        )


@triton.jit
def _merge_partitions_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    part_acc_ptr,  # [num_seqs, num_heads, num_partitions, HEAD_DIM_P2] fp32
    part_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32, log2 domain
    part_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    seq_lens_ptr,  # [num_seqs] int32
    out_stride_seq,
    out_stride_head,
    partition_size,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    NUM_PARTITIONS_P2: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Partitions past this sequence's end were never written.
    num_valid = tl.cdiv(seq_len, partition_size)
    parts = tl.arange(0, NUM_PARTITIONS_P2)
    part_mask = parts < num_valid
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_mask = dims < HEAD_DIM

    stat_offsets = (seq * tl.num_programs(1) + head) * num_partitions + parts
    part_max = tl.load(part_max_ptr + stat_offsets, mask=part_mask, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + stat_offsets, mask=part_mask, other=0.0)
    part_acc = tl.load(
        part_acc_ptr + stat_offsets[:, None] * HEAD_DIM_P2 + dims[None, :],
        mask=part_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    global_max = tl.max(part_max, axis=0)
    # An empty sequence has no valid partition; keep its weights finite (all zero).
    global_max = tl.where(global_max == float("-inf"), 0.0, global_max)
    weights = tl.where(part_mask, tl.exp2(part_max - global_max), 0.0)
    total = tl.sum(part_sum * weights, axis=0)
    out = tl.sum(part_acc * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * out_stride_seq + head * out_stride_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_mask,
    )


def num_decode_partitions(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, partition_size: int | None
) -> tuple[int, int]:
    """(partition_size, num_partitions) for a decode step.

    An explicit `partition_size` always splits; otherwise the context is split
    only when there are too few (sequence, KV head) pairs to fill the GPU.
    """
    if partition_size is None:
        partition_size = DEFAULT_PARTITION_SIZE
        if num_seqs * num_kv_heads >= _SPLIT_BELOW_NUM_PROGRAMS:
            partition_size = max(partition_size, triton.next_power_of_2(max_seq_len))
    if partition_size <= 0 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two, got {partition_size}")
    return partition_size, max(1, triton.cdiv(max_seq_len, partition_size))


def paged_attention_decode(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens, the new one included
    scale: float,
    max_seq_len: int | None = None,
    partition_size: int | None = None,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
) -> torch.Tensor:
    """Decode attention over the paged cache; see `paged_attention_decode_ref`.

    Args:
        max_seq_len: the longest entry of `seq_lens`; read from the tensor (a
            device sync) when not given. It sizes the split of the context.
        partition_size: tokens per context partition (a power of two of at
            least 16); None picks one from the batch shape.
        out: where to write the result; a new tensor when None.

    Returns:
        The attention output, [num_seqs, num_heads, head_dim] in the query's dtype.
    """
    num_seqs, num_heads, head_dim = query.shape
    _check_decode_inputs(query, k_cache, v_cache, block_tables, seq_lens)
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.stride(2) != 1:
        raise ValueError(f"out {tuple(out.shape)} must match query and be contiguous in head_dim")
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())

    group = num_heads // num_kv_heads
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    partition_size, num_partitions = num_decode_partitions(
        num_seqs, num_kv_heads, max_seq_len, partition_size
    )
    tile_n = min(64, partition_size)
    if tile_n < 16:
        raise ValueError(f"partition_size must be at least 16, got {partition_size}")
    if num_partitions > 1:
        part_acc = torch.empty(
            (num_seqs, num_heads, num_partitions, head_dim_p2),
            dtype=torch.float32,
            device=query.device,
        )
        part_max = torch.empty(
            (num_seqs, num_heads, num_partitions), dtype=torch.float32, device=query.device
        )
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused by the kernel

    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out,
        part_acc,
        part_max,
        part_sum,
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        partition_size,
        num_partitions,
        QUERY_GROUP=group,
        QUERY_GROUP_P2=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        SPLIT=num_partitions > 1,
        DOT_PRECISION=dot_precision(query.dtype),
        DOT_IN_FP32=dot_in_fp32(_decode_kernel, query.dtype),
    )
    if num_partitions > 1:
        _merge_partitions_kernel[(num_seqs, num_heads)](
            out,
            part_acc,
            part_max,
            part_sum,
            seq_lens,
            out.stride(0),
            out.stride(1),
            partition_size,
            num_partitions,
            HEAD_DIM=head_dim,
            HEAD_DIM_P2=head_dim_p2,
            NUM_PARTITIONS_P2=triton.next_power_of_2(num_partitions),
        )
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision products; tf32 would lose digits the reference keeps."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_in_fp32(kernel: object, dtype: torch.dtype) -> bool:
    """Whether to upcast bf16 operands before `tl.dot`.

    Triton's CPU interpreter multiplies bf16 tiles as their raw 16-bit integers,
    so under it bf16 K/V are widened first; compiled kernels keep the bf16 dot.
    """
    return dtype == torch.bfloat16 and type(kernel).__name__ == "InterpretedFunction"


def is_interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return type(_decode_kernel).__name__ == "InterpretedFunction"


def _check_decode_inputs(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    check_paged_inputs(query, k_cache, v_cache, block_tables)
    num_seqs = query.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} seqs")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be int32 [{num_seqs}], got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )


def check_paged_inputs(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
) -> None:
    """Shape, stride and dtype checks shared by the decode and prefill launchers."""
    if query.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"query must be 3-D and the cache 4-D, got {query.dim()}-D and {k_cache.dim()}-D"
        )
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if query.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != query.dtype:
        raise ValueError(
            f"query and cache must share one of fp32/fp16/bf16, got {query.dtype} "
            f"and {k_cache.dtype}"
        )
    if query.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("the head dimension of query and the cache must be contiguous")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be 2-D int32, got {block_tables.dtype}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if query.device != k_cache.device:
        raise ValueError(f"query on {query.device} but cache on {k_cache.device}")
