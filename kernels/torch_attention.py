"""Torch attention over the paged cache: the CPU serving path.

A step is planned once and the plan is used by every layer:

- Decoding sequences (one query each) are grouped by context length into buckets
  whose padding stays small, and each bucket runs as one batched, masked attention:
  a few ops per bucket instead of a dozen per sequence.
- Prefill chunks run one sequence at a time through torch's flash SDPA
  (`prefill_attention`), which never holds the full score matrix.

In decode buckets, query heads of a group share one view of their KV head (no copy per
query head), and everything runs in fp32 whatever the cache dtype: CPU products on
strided 16-bit operands are several times slower than upcasting them first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A decode bucket may hold at most this many padded context slots per real one.
MAX_PADDING_RATIO = 1.2


@dataclass(frozen=True)
class PrefillPlan:
    """One sequence with more than one query this step."""

    start: int
    end: int
    seq_len: int
    blocks: torch.Tensor  # [num_blocks_needed] int64


@dataclass(frozen=True)
class DecodeBucket:
    """Decoding sequences of similar context length, attended to as one padded batch."""

    rows: torch.Tensor  # [n] int64: each sequence's query row in the step
    block_tables: torch.Tensor  # [n, max_blocks] int64
    seq_lens: torch.Tensor  # [n] int64
    max_len: int  # max_blocks * block_size


@dataclass(frozen=True)
class StepPlan:
    prefills: list[PrefillPlan]
    decodes: list[DecodeBucket]


def plan_step(
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens, this step's included
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    block_size: int,
) -> StepPlan:
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    tables = block_tables.long()
    prefills: list[PrefillPlan] = []
    decoding: list[int] = []
    for i, seq_len in enumerate(lens):
        num_queries = starts[i + 1] - starts[i]
        if num_queries == 1:
            decoding.append(i)
        elif num_queries > 1:
            blocks = tables[i, : -(-seq_len // block_size)]
            prefills.append(PrefillPlan(starts[i], starts[i + 1], seq_len, blocks))
    return StepPlan(prefills, _bucket_decodes(decoding, starts, lens, tables, block_size))


def _bucket_decodes(
    decoding: list[int], starts: list[int], lens: list[int], tables: torch.Tensor, block_size: int
) -> list[DecodeBucket]:
    """Group decodes, shortest context first, while padding stays under MAX_PADDING_RATIO."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(decoding, key=lambda i: lens[i]):
        padded = lens[i] * (len(groups[-1]) + 1) if groups else 0
        if groups and padded <= MAX_PADDING_RATIO * (total + lens[i]):
            groups[-1].append(i)
            total += lens[i]
        else:
            groups.append([i])
            total = lens[i]
    buckets = []
    for group in groups:
        num_blocks = -(-max(lens[i] for i in group) // block_size)
        index = torch.tensor(group)
        buckets.append(
            DecodeBucket(
                rows=torch.tensor([starts[i] for i in group]),
                block_tables=tables[index, :num_blocks],
                seq_lens=torch.tensor([lens[i] for i in group]),
                max_len=num_blocks * block_size,
            )
        )
    return buckets


def paged_attention_torch(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: StepPlan,
    scale: float,
    key: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]: this step's
    value: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention for every sequence of a step, decodes and prefill chunks alike.

    With the step's own `key` and `value`, a prefill chunk without a cached prefix attends
    to them rather than to the cache (the same values, read without a gather).
    """
    num_kv_heads = k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    out = torch.empty_like(query)
    query32 = query.float() if plan.decodes else query
    for bucket in plan.decodes:
        out[bucket.rows] = _decode_bucket(query32, k_cache, v_cache, bucket, group, scale).to(
            out.dtype
        )
    for p in plan.prefills:
        out[p.start : p.end] = prefill_attention(query, k_cache, v_cache, p, scale, key, value)
    return out


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    p: PrefillPlan,
    scale: float,
    key: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]: this step's
    value: torch.Tensor | None = None,
) -> torch.Tensor:  # [p.end - p.start, num_heads, head_dim]
    """Causal attention of one prefill chunk through torch's flash SDPA (no score matrix).

    The chunk's queries are the last positions of its sequence. A chunk after a cached
    prefix reads the prefix's blocks (one gather per chunk, not per layer and query); the
    mask then puts the causal diagonal at the end of the context rather than its start.
    """
    num_kv_heads, head_dim = k_cache.shape[2:]
    q_len = p.end - p.start
    mask = None
    if key is not None and value is not None and p.seq_len == q_len:
        # Rounded to the cache's dtype, as a read from the cache would be.
        k = key[p.start : p.end].to(k_cache.dtype)
        v = value[p.start : p.end].to(v_cache.dtype)
    else:
        k = k_cache.index_select(0, p.blocks).view(-1, num_kv_heads, head_dim)[: p.seq_len]
        v = v_cache.index_select(0, p.blocks).view(-1, num_kv_heads, head_dim)[: p.seq_len]
        if p.seq_len > q_len:
            mask = torch.ones(q_len, p.seq_len, dtype=torch.bool).tril(p.seq_len - q_len)
    # The cache may be narrower than the queries (bfloat16 under float32 compute).
    k, v = k.to(query.dtype), v.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query[p.start : p.end].transpose(0, 1)[None],  # [1, num_heads, q_len, head_dim]
        k.transpose(0, 1)[None],  # [1, num_kv_heads, seq_len, head_dim]
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _decode_bucket(
    query32: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bucket: DecodeBucket,
    group: int,
    scale: float,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    num_kv_heads, head_dim = k_cache.shape[2:]
    n = bucket.rows.numel()
    # [n, max_len, num_kv_heads, head_dim] -> [n, num_kv_heads, max_len, head_dim]
    shape = (n, bucket.max_len, num_kv_heads, head_dim)
    # index_select over the flattened table copies less than 2-D advanced indexing.
    blocks = bucket.block_tables.flatten()
    keys = k_cache.index_select(0, blocks).view(shape).float().transpose(1, 2)
    values = v_cache.index_select(0, blocks).view(shape).float().transpose(1, 2)
    q = query32[bucket.rows].view(n, num_kv_heads, group, head_dim)
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale  # [n, num_kv_heads, group, max_len]
    padding = torch.arange(bucket.max_len) >= bucket.seq_lens[:, None]  # [n, max_len]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values).view(n, num_kv_heads * group, head_dim)
