"""Checkpoint loading: sharded weights, config parsing, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import make_llama

from twolane.models.config import ModelConfig, UnsupportedModelError
from twolane.models.loader import safetensors_files
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import SamplingParams


def test_sharded_checkpoint_with_index_gives_the_same_tokens(
    llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    shutil.copy(llama_dir / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(safetensors_files(sharded)) > 1

    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [100, 3]]
    whole = EngineCore(EngineConfig(model=str(llama_dir), num_blocks=32)).generate(prompts, params)
    split = EngineCore(EngineConfig(model=str(sharded), num_blocks=32)).generate(prompts, params)
    assert split == whole


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_config_reads_gqa_bias_tying_and_llama3_rope(llama_dir: Path, qwen2_dir: Path) -> None:
    llama = ModelConfig.from_dir(llama_dir)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert llama.rope_scaling is not None and llama.rope_scaling.factor == 8.0
    assert llama.rope_theta == 500000.0
    assert not llama.attention_bias and not llama.tie_word_embeddings
    qwen = ModelConfig.from_dir(qwen2_dir)
    assert qwen.attention_bias and qwen.tie_word_embeddings and qwen.num_kv_heads == 1


def test_missing_tensor_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = make_llama(tmp_path / "broken")
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        EngineCore(EngineConfig(model=str(model_dir), num_blocks=8))


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    shutil.copy(Path(make_llama(tmp_path / "m")) / "tokenizer.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        EngineCore(EngineConfig(model=str(tmp_path), num_blocks=8))
