"""The engine's frozen configuration, built once at the edge (CLI or test)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the engine core.

    Args:
        model: a Hugging Face checkpoint directory, or "builtin".
        dtype: "float32" or "bfloat16" (CPU), also "float16" on CUDA.
        device: "cpu" or "cuda".
        block_size: tokens per KV block.
        num_blocks: KV blocks in the cache; 0 sizes the cache from `kv_cache_bytes`.
        kv_cache_bytes: memory for K and V of all layers when `num_blocks` is 0.
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most tokens (prefill chunks + decodes) in one step.
        max_model_len: longest sequence (prompt + output); 0 takes the model's own.
        enable_prefix_caching: reuse full KV blocks across requests with equal prefixes.
        max_waiting_interactive: interactive requests allowed to wait before new ones
            are refused (backpressure instead of an unbounded queue).
        seed: seed of the built-in model's weights.
        attention_backend: "auto" (by device), "torch" or "triton".
        reserved_block_fraction: share of KV blocks that new batch work may not take, kept
            free so a burst of interactive requests finds room without preempting.
        max_batch_share: share of `max_num_seqs` that batch sequences may hold, so an
            interactive request finds a free slot.
        interactive_ttft_target_s: the first-token latency the interactive lane aims for.
            While interactive work is around, batch tokens per step are adapted so a step
            lasts at most half of it. A request arriving mid-step usually starts at the next
            layer boundary in an urgent step; one that cannot (no free block or slot) waits
            at most that long, and running interactive sequences wait at most that long
            for each token.
    """

    model: str = "builtin"
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int = 0
    kv_cache_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0
    enable_prefix_caching: bool = True
    max_waiting_interactive: int = 256
    seed: int = 0
    attention_backend: str = "auto"
    reserved_block_fraction: float = 0.1
    max_batch_share: float = 0.875
    interactive_ttft_target_s: float = 0.5

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.max_waiting_interactive <= 0:
            raise ValueError("max_waiting_interactive must be positive")
        if not 0.0 <= self.reserved_block_fraction < 1.0:
            raise ValueError("reserved_block_fraction must be in [0, 1)")
        if not 0.0 < self.max_batch_share <= 1.0:
            raise ValueError("max_batch_share must be in (0, 1]")
        if self.interactive_ttft_target_s <= 0:
            raise ValueError("interactive_ttft_target_s must be positive")
