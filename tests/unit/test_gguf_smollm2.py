"""SmolLM2's GGUF file (Q4_1 and Q8_0 tensors) converts to exactly transformers' weights."""

from __future__ import annotations

import json

import pytest
import torch
from smollm2 import hf_smollm2_model, smollm2_dir

from twolane.models.config import ModelConfig
from twolane.models.loader import load_model

# Our decoder fuses q/k/v and gate/up: (Hugging Face suffix, our suffix, which slice).
FUSED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}


def our_tensor(params: dict[str, torch.Tensor], hf_name: str, config: ModelConfig) -> torch.Tensor:
    """Our model's part that corresponds to one transformers tensor."""
    name = hf_name.removeprefix("model.")
    for hf_suffix, (our_suffix, index) in FUSED.items():
        if name.endswith(hf_suffix):
            fused = params[name.replace(hf_suffix, our_suffix)]
            q_rows = config.num_heads * config.head_dim
            kv_rows = config.num_kv_heads * config.head_dim
            sizes = (
                [q_rows, kv_rows, kv_rows]
                if "qkv" in our_suffix
                else [config.intermediate_size] * 2
            )
            return fused.split(sizes)[index]
    return params[name]


def test_loaded_weights_equal_transformers_gguf_weights() -> None:
    model, config = load_model(smollm2_dir(), "float32", "cpu", max_positions=64)
    params = dict(model.named_parameters(remove_duplicate=False))
    reference = hf_smollm2_model().state_dict()
    assert len(reference) == 3 + 9 * config.num_layers  # embed, norm, lm_head; 9 per layer
    for name, expected in reference.items():
        # Dequantized values, the q/k rows un-permuted: equal bit for bit, not just close.
        torch.testing.assert_close(
            our_tensor(params, name, config), expected, rtol=0, atol=0, msg=name
        )


def test_config_matches_transformers_reading_of_the_metadata() -> None:
    ours = ModelConfig.from_dir(smollm2_dir())
    theirs = hf_smollm2_model().config
    assert ours.architecture == "LlamaForCausalLM"
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size) == (
        theirs.vocab_size,
        theirs.hidden_size,
        theirs.intermediate_size,
    )
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (30, 9, 3, 64)
    assert ours.num_layers == theirs.num_hidden_layers
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours.rope_scaling is None
    assert ours.max_position_embeddings == theirs.max_position_embeddings == 8192
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours.tie_word_embeddings and theirs.tie_word_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))


def test_converted_directory_holds_a_plain_hugging_face_checkpoint() -> None:
    model_dir = smollm2_dir()
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert "<|im_start|>" in tokenizer_config["chat_template"]


def test_referee_greedy_tokens_come_with_their_margins() -> None:
    from smollm2 import hf_smollm2_greedy

    from twolane.models.chat import ChatTemplate
    from twolane.models.tokenizer import Tokenizer

    template = ChatTemplate.from_dir(smollm2_dir())
    tokenizer = Tokenizer.from_dir(smollm2_dir())
    assert template is not None
    prompt = template.render([("user", "What is the capital of France?")])
    (run,) = hf_smollm2_greedy([tokenizer.encode(prompt, add_special_tokens=False)], 8)
    assert len(run.token_ids) == len(run.margins) == 8
    assert all(margin >= 0 for margin in run.margins)
    assert tokenizer.decode(run.token_ids).startswith("The capital of France is Paris.")
    assert run.token_ids[7] == 2  # <|im_end|>: EOS is chosen but does not stop the referee
