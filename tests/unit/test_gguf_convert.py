"""GGUF conversion of tiny Llama and Qwen2 files written the way llama.cpp writes them.

The referees: the original transformers weights the file was made from, and transformers'
own GGUF loader reading the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import add_tokenizer, gguf_tensors, tiny_hf_model, write_tiny_gguf
from safetensors.torch import load_file

from twolane.models.config import ModelConfig, UnsupportedModelError
from twolane.models.errors import GGUFError
from twolane.models.gguf import convert_gguf


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "llama.gguf", "llama")
    write_tiny_gguf(folder / "qwen2.gguf", "qwen2")
    return folder


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_converted_weights_equal_the_original_and_transformers_gguf_load(
    gguf_dir: Path, tmp_path: Path, arch: str
) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = convert_gguf(gguf_dir / f"{arch}.gguf", cache_dir=tmp_path)
    ours = load_file(model_dir / "model.safetensors")
    original = tiny_hf_model(arch).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=f"{arch}.gguf", dtype=torch.float32
    ).state_dict()
    tied = arch == "qwen2"
    assert set(ours) == set(original) - ({"lm_head.weight"} if tied else set())
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_config_describes_the_original_model(gguf_dir: Path, tmp_path: Path, arch: str) -> None:
    model = tiny_hf_model(arch)
    original = model.config
    config = ModelConfig.from_dir(convert_gguf(gguf_dir / f"{arch}.gguf", cache_dir=tmp_path))
    assert config.architecture == type(model).__name__
    assert config.num_layers == original.num_hidden_layers
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.intermediate_size == original.intermediate_size
    assert config.vocab_size == original.vocab_size
    assert config.rms_norm_eps == original.rms_norm_eps
    assert config.rope_theta == original.rope_parameters["rope_theta"]
    assert config.max_position_embeddings == original.max_position_embeddings
    assert config.tie_word_embeddings == (arch == "qwen2")
    assert config.attention_bias == (arch == "qwen2")
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_second_conversion_reuses_the_first(gguf_dir: Path, tmp_path: Path) -> None:
    first = convert_gguf(gguf_dir / "llama.gguf", cache_dir=tmp_path)
    written_ns = (first / "model.safetensors").stat().st_mtime_ns
    second = convert_gguf(gguf_dir / "llama.gguf", cache_dir=tmp_path)
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == written_ns
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_a_different_file_gets_its_own_directory(gguf_dir: Path, tmp_path: Path) -> None:
    other = write_tiny_gguf(tmp_path / "other.gguf", "llama", seed=7)
    first = convert_gguf(gguf_dir / "llama.gguf", cache_dir=tmp_path / "cache")
    second = convert_gguf(other, cache_dir=tmp_path / "cache")
    assert first != second
    assert not torch.equal(
        load_file(first / "model.safetensors")["model.embed_tokens.weight"],
        load_file(second / "model.safetensors")["model.embed_tokens.weight"],
    )


def write_llama_with_rope_freqs(path: Path, rope_parameters: dict[str, float]) -> torch.Tensor:
    """A tiny Llama GGUF whose `rope_freqs.weight` holds what Llama 3 scaling divides by
    (computed by transformers); returns transformers' scaled inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = tiny_hf_model("llama")
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, **rope_parameters}
    config = LlamaConfig(**{**model.config.to_dict(), "rope_parameters": rope})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (50000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    add_tokenizer(writer, "llama-bpe")
    writer.add_tensor("rope_freqs.weight", (base / scaled.double()).numpy().astype(np.float32))
    for name, values in gguf_tensors(model, "llama").items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return scaled


@pytest.mark.parametrize(
    "rope_parameters",
    [
        # Two frequencies inside the band: the parameters are fitted.
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 2048},
        # Llama 3.1's own values; one frequency in the band, so the defaults are checked.
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ],
)  # fmt: skip
def test_rope_freqs_tensor_becomes_llama3_scaling(
    tmp_path: Path, rope_parameters: dict[str, float]
) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected = write_llama_with_rope_freqs(tmp_path / "llama3.gguf", rope_parameters)
    model_dir = convert_gguf(tmp_path / "llama3.gguf", cache_dir=tmp_path / "cache")
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "llama3"
    assert ModelConfig.from_dir(model_dir).rope_scaling is not None
    # Whatever parameters were chosen, transformers computes the same frequencies from them.
    recovered, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**raw), "cpu")
    torch.testing.assert_close(recovered, expected, rtol=1e-5, atol=0)
    assert "rope_freqs.weight" not in load_file(model_dir / "model.safetensors")


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported; supported: llama"):
        convert_gguf(tmp_path / "gpt2.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_unsupported_rope_scaling_is_named(tmp_path: Path) -> None:
    model = tiny_hf_model("llama")
    writer = gguf.GGUFWriter(str(tmp_path / "yarn.gguf"), "llama")
    for key, value in {
        "context_length": 256,
        "embedding_length": 64,
        "feed_forward_length": 96,
        "block_count": 2,
        "attention.head_count": 4,
    }.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(4.0)
    add_tokenizer(writer, "llama-bpe")
    for name, values in gguf_tensors(model, "llama").items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="unsupported rope scaling 'yarn'") as info:
        convert_gguf(tmp_path / "yarn.gguf", cache_dir=tmp_path / "cache")
    assert str(info.value).startswith(f"{tmp_path / 'yarn.gguf'}: ")
