"""Load a Hugging Face checkpoint directory into the engine's model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from twolane.models.config import ModelConfig
from twolane.models.llama import LlamaForCausalLM, RotaryEmbedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: the ones its index names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_model(
    model_dir: Path, dtype: str, device: str, max_positions: int
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model for `model_dir` and fill it from its safetensors files."""
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    # Materialise on the target device without running the random initialisers.
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(iter_weights(safetensors_files(model_dir)))
    model = model.to(torch_dtype)
    # Rotary tables are computed from the config, not read from the checkpoint, and stay
    # in fp32: positions past a few hundred lose precision in bf16.
    rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
    rotary = rotary.to(device)
    for layer in model.layers:
        layer.self_attn.rotary = rotary
    model.eval()
    return model, config
