"""The model's shape, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a Llama-family decoder this engine can run."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {architectures or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = int(raw["num_attention_heads"])
        hidden_size = int(raw["hidden_size"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        # Qwen2 always has q/k/v biases; Llama exposes it as `attention_bias`.
        attention_bias = arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta") or _rope_parameters(raw).get("rope_theta", 1e4)),
            rope_scaling=_parse_rope_scaling(raw),
            max_position_embeddings=_max_positions(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))


def _max_positions(raw: dict[str, Any]) -> int:
    max_positions = int(raw.get("max_position_embeddings", 2048))
    window = raw.get("sliding_window")
    # Attention here is always full; capping the context at the window keeps it exact
    # for sliding-window checkpoints (Mistral v0.1) instead of silently wrong past it.
    if window and raw.get("use_sliding_window", True):
        return min(max_positions, int(window))
    return max_positions


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    # Newer transformers releases write `rope_parameters` instead of `rope_scaling`.
    return raw.get("rope_scaling") or raw.get("rope_parameters") or {}


def _parse_rope_scaling(raw: dict[str, Any]) -> RopeScaling | None:
    params = _parse_rope_type(raw)
    if params is None:
        return None
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _parse_rope_type(raw: dict[str, Any]) -> dict[str, Any] | None:
    params = _rope_parameters(raw)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"unsupported rope scaling {rope_type!r}; supported: default, llama3"
        )
    return params
