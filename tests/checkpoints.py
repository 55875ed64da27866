"""Small random Hugging Face checkpoints and transformers' greedy tokens, the parity referee."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from twolane.models.builtin import builtin_model_dir

VOCAB_SIZE = 300
# Scaling lm_head widens the gaps between the top logits of random weights, so that no
# greedy choice is a near-tie that float rounding could flip.
LM_HEAD_SCALE = 40.0


def make_llama(model_dir: Path, seed: int = 0, **overrides: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 500000.0,
        },
        **overrides,
    )
    return _save(LlamaForCausalLM, config, model_dir, seed)


def make_qwen2(model_dir: Path, seed: int = 1) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    )
    return _save(Qwen2ForCausalLM, config, model_dir, seed)


def _save(model_cls: type, config: object, model_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.normal_(0.0, 0.1)  # non-zero q/k/v biases, or they would test nothing
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(model_dir, safe_serialization=True)
    shutil.copy(builtin_model_dir() / "tokenizer.json", model_dir / "tokenizer.json")
    return model_dir


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens from transformers `generate()`, one prompt at a time, EOS ignored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Plain greedy over the whole vocabulary: no EOS stop and no EOS suppression, which is
    # what the engine does with ignore_eos.
    model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs
