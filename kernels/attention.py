"""Attention backends: one interface, picked by device."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from twolane.kernels import native
from twolane.kernels.native_attention import NativePlan, paged_attention_native, plan_native_step
from twolane.kernels.reference import store_kv_cache_ref
from twolane.kernels.torch_attention import StepPlan, paged_attention_torch, plan_step


@dataclass(frozen=True)
class AttentionMetadata:
    """Where one step's tokens live in the paged cache. Built once per step, shared by layers.

    `plan` holds what the backend derived from the rest once for the step (`prepare`). It
    lives here rather than in the backend, so that a step nested inside another one's
    forward pass (an urgent step) has a plan of its own and never overwrites the outer one.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = padding, not stored
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    plan: Any = None

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        """The step's metadata with the backend's plan attached; called once per step."""
        ...

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
    """CPU attention in plain torch: the fallback where the native op cannot run.

    `fallback_reason` says why the native op was not picked, when it was wanted.
    """

    name = "torch"

    def __init__(self, fallback_reason: str | None = None) -> None:
        self.fallback_reason = fallback_reason

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        plan = plan_step(meta.query_start_loc, meta.seq_lens, meta.block_tables, block_size)
        return dataclasses.replace(meta, plan=plan)

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
        if not isinstance(meta.plan, StepPlan):
            raise ValueError("the torch backend needs metadata from its prepare()")
        return paged_attention_torch(query, k_cache, v_cache, meta.plan, scale, key, value)


class NativeAttentionBackend:
    """What CPU serving runs: the native op for decodes and the K/V store, SDPA for prefill."""

    name = "native"

    def __init__(self, ops: native.NativeOps) -> None:
        self.ops = ops

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        plan = plan_native_step(
            meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, block_size
        )
        return dataclasses.replace(meta, plan=plan)

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
        self.ops.store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        if not isinstance(meta.plan, NativePlan):
            raise ValueError("the native backend needs metadata from its prepare()")
        return paged_attention_native(
            self.ops, query, key, value, k_cache, v_cache, meta.plan, scale
        )


class TritonAttentionBackend:
    """The GPU path: Triton kernels for the store, decode and prefill.

    Triton is imported here rather than at module import, so that CPU serving
    works without it. When `flash_attn_varlen` is given (flash-attn installed,
    CUDA), prefill steps where no sequence has a cached prefix run through it on
    the step's own K/V; steps with a cached prefix read the paged cache with the
    Triton prefill kernel.
    """

    name = "triton"

    def __init__(self, flash_attn_varlen: Callable[..., torch.Tensor] | None = None) -> None:
        from twolane.kernels.triton_decode import paged_attention_decode
        from twolane.kernels.triton_prefill import paged_prefill_attention
        from twolane.kernels.triton_store import store_kv_cache

        self._store = store_kv_cache
        self._decode = paged_attention_decode
        self._prefill = paged_prefill_attention
        self._flash_attn_varlen = flash_attn_varlen

    def prepare(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        """The plan is whether some sequence attends to tokens cached before this step."""
        return dataclasses.replace(meta, plan=_has_cached_prefix(meta))

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
        self._store(key, value, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return self._decode(
                query,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                max_seq_len=meta.max_seq_len,
            )
        flash_attn_varlen = self._flash_attn_varlen
        if flash_attn_varlen is not None and self._can_use_flash_attn(query, meta):
            return flash_attn_varlen(
                query,
                key,
                value,
                cu_seqlens_q=meta.query_start_loc,
                cu_seqlens_k=meta.query_start_loc,
                max_seqlen_q=meta.max_query_len,
                max_seqlen_k=meta.max_query_len,
                softmax_scale=scale,
                causal=True,
            )
        return self._prefill(
            query,
            k_cache,
            v_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            scale,
            max_query_len=meta.max_query_len,
        )

    def _can_use_flash_attn(self, query: torch.Tensor, meta: AttentionMetadata) -> bool:
        if self._flash_attn_varlen is None or query.dtype not in (torch.float16, torch.bfloat16):
            return False
        return meta.plan is False  # prepared, and no sequence has a cached prefix


def _has_cached_prefix(meta: AttentionMetadata) -> bool:
    if meta.max_seq_len > meta.max_query_len:
        return True  # the longest sequence cannot be all new tokens
    query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    return bool((meta.seq_lens != query_lens).any())


def get_attention_backend(
    name: str, device: str, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> AttentionBackend:
    """Pick a backend.

    Args:
        name: "auto" (native on CPU where it loads and fits the model, else torch; Triton
            on CUDA), "native", "torch" or "triton". Triton on CPU runs only in Triton's
            interpreter (`TRITON_INTERPRET=1`), which is slow and meant for tests.
        device: the device the model runs on, "cpu" or "cuda[:N]".
        head_dim, dtype: the model's, when known: the native op needs a head_dim that is
            a multiple of its vector width and a float32 or bfloat16 cache.

    Raises:
        ValueError: unknown name, or a backend requested where it cannot run.
    """
    device_type = torch.device(device).type
    if name == "torch":
        return TorchAttentionBackend()
    if name in ("auto", "native") and device_type == "cpu":
        try:
            ops = native.load()
        except native.NativeUnavailable as e:
            if name == "native":
                raise ValueError(f"attention backend 'native' cannot run here: {e}") from None
            return TorchAttentionBackend(fallback_reason=str(e))
        if head_dim is not None and dtype is not None and not ops.supports(head_dim, dtype):
            reason = (
                f"the native op ({ops.isa}, {ops.vector_lanes} lanes) does not take head_dim "
                f"{head_dim} in {dtype}"
            )
            if name == "native":
                raise ValueError(f"attention backend 'native' cannot run here: {reason}")
            return TorchAttentionBackend(fallback_reason=reason)
        return NativeAttentionBackend(ops)
    if name == "native":
        raise ValueError(f"attention backend 'native' runs on cpu only, not {device!r}")
    if name == "auto" and device_type == "cuda":
        return _triton_backend(device_type) if _triton_available() else TorchAttentionBackend()
    if name == "triton":
        if not _triton_available():
            raise ValueError("attention backend 'triton' needs the triton package installed")
        if device_type == "cpu" and not _triton_interpreting():
            raise ValueError(
                "attention backend 'triton' on cpu runs only in Triton's interpreter; "
                "set TRITON_INTERPRET=1 before starting, or use 'torch'"
            )
        return _triton_backend(device_type)
    raise ValueError(
        f"unknown attention backend {name!r} for device {device!r}; "
        "known: auto, native, torch, triton"
    )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _triton_backend(device_type: str) -> TritonAttentionBackend:
    backend = TritonAttentionBackend(_load_flash_attn() if device_type == "cuda" else None)
    if device_type == "cpu":
        from twolane.kernels.triton_decode import is_interpreted

        if not is_interpreted():
            raise ValueError(
                "the Triton kernels were imported before TRITON_INTERPRET=1 was set, "
                "so they cannot run on cpu"
            )
    return backend


def _load_flash_attn() -> Callable[..., torch.Tensor] | None:
    """flash-attn's varlen kernel when the optional `gpu` extra is installed and loads."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):
        return None
    varlen: Callable[..., torch.Tensor] = flash_attn_varlen_func
    return varlen
