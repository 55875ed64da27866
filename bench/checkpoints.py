"""The benchmark's models: the built-in tiny Llama and a wider random Llama.

The wider one is big enough that matrix products, not Python, dominate a step,
so the benchmark shows batching efficiency as well as scheduler overhead. It is
written once with transformers into a cache directory, with the built-in
byte-level tokenizer beside it (requests carry token ids, so the tokenizer only
has to load).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twolane.models.builtin import (
    BUILTIN_CONFIG,
    builtin_model_dir,
    cache_root,
    cached_checkpoint,
)

WIDE_NAME = "wide"
SMALL_NAME = "small"
WIDE_FORMAT_VERSION = 1
WIDE_CONFIG: dict[str, int | float] = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


# A small Llama whose steps are short (a few ms), as every model's are on a GPU: where
# what the server does beside the model decides the latency.
SMALL_CONFIG: dict[str, int | float] = {
    **WIDE_CONFIG,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs to know about a Llama checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a transformers config.json (parsed JSON: numbers)."""
        hidden = int(config["hidden_size"])
        num_heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or hidden // num_heads
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config["num_key_value_heads"]),
            head_dim=int(head_dim),
        )

    @property
    def num_matmul_params(self) -> int:
        """Weights every token multiplies: the layers' projections and lm_head."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size
        return self.num_layers * per_layer + self.vocab_size * h

    @property
    def num_weight_params(self) -> int:
        """All weights a decode step reads: the matmul weights plus the embedding rows (few)."""
        return self.num_matmul_params

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes

    def attention_flops(self, num_context_tokens: int) -> int:
        """Scores and the weighted sum for one query token over a context."""
        return 4 * self.num_layers * self.num_heads * self.head_dim * num_context_tokens


def model_dir(name: str) -> Path:
    """The checkpoint directory of `builtin`, `wide` or `small`, written on first use."""
    if name == "builtin":
        return builtin_model_dir()
    if name == WIDE_NAME:
        return wide_model_dir()
    if name == SMALL_NAME:
        return wide_model_dir(name=SMALL_NAME, config=SMALL_CONFIG)
    return Path(name)


def model_shape(name: str) -> ModelShape:
    import json

    if name == "builtin":
        return ModelShape.from_config(BUILTIN_CONFIG)
    return ModelShape.from_config(json.loads((model_dir(name) / "config.json").read_text()))


def wide_model_dir(
    seed: int = 0, name: str = WIDE_NAME, config: Mapping[str, int | float] = WIDE_CONFIG
) -> Path:
    """A random Llama's checkpoint (the wide one by default), written with transformers on
    first use."""

    def write(model_dir: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        # LlamaConfig's keywords are typed one by one; `config` holds some of them.
        shape: dict[str, Any] = dict(config)
        llama = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
        model = LlamaForCausalLM(llama).float().eval()
        model.save_pretrained(model_dir, safe_serialization=True)
        shutil.copy(builtin_model_dir() / "tokenizer.json", model_dir / "tokenizer.json")

    return cached_checkpoint(
        cache_root() / f"bench-{name}-v{WIDE_FORMAT_VERSION}-seed{seed}", write
    )
