"""Attention backends: one interface, picked by device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from twolane.kernels.reference import (
    paged_attention_decode_ref,
    paged_prefill_attention_ref,
    store_kv_cache_ref,
)


@dataclass(frozen=True)
class AttentionMetadata:
    """Where one step's tokens live in the paged cache. Built once per step, shared by layers."""

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = padding, not stored
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store this step's K/V in the cache, then attend over the whole context."""
        ...


class TorchAttentionBackend:
    """The reference path; what CPU serving runs."""

    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv_cache_ref(key, value, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return paged_attention_decode_ref(
                query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale
            )
        return paged_prefill_attention_ref(
            query,
            k_cache,
            v_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            scale,
        )


def get_attention_backend(name: str, device: str) -> AttentionBackend:
    """Pick a backend. `name` is "auto" (torch on CPU), or "torch"."""
    if name in ("auto", "torch") and (device == "cpu" or name == "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} for device {device!r}; known: torch")
