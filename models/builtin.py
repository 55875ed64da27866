"""The built-in model: a tiny Llama with seeded weights and a byte-level tokenizer.

It is written once as an ordinary Hugging Face checkpoint directory (config.json,
model.safetensors, tokenizer.json) under the cache dir, so the engine loads it the
same way as any other checkpoint and transformers can load it as a referee.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

BUILTIN_NAME = "builtin"
NUM_BYTE_TOKENS = 256
BOS_TOKEN_ID = NUM_BYTE_TOKENS
EOS_TOKEN_ID = NUM_BYTE_TOKENS + 1
# Bumped whenever the generated checkpoint changes, so stale caches are not reused.
FORMAT_VERSION = 2

BUILTIN_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": NUM_BYTE_TOKENS + 2,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "torch_dtype": "float32",
}


def cache_root() -> Path:
    env = os.environ.get("TWOLANE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twolane"


def builtin_model_dir(seed: int = 0) -> Path:
    """Return the built-in checkpoint directory for `seed`, writing it on first use."""

    def write(model_dir: Path) -> None:
        write_checkpoint(model_dir, BUILTIN_CONFIG, seed)
        byte_level_tokenizer().save(str(model_dir / "tokenizer.json"))

    return cached_checkpoint(cache_root() / f"builtin-v{FORMAT_VERSION}-seed{seed}", write)


def cached_checkpoint(target: Path, write: Callable[[Path], None]) -> Path:
    """Return `target`, first having `write` fill it if it holds no weights yet.

    `write` fills a temporary sibling that is then renamed, so a concurrent reader never
    sees half a checkpoint; when two writers race, the first rename wins.
    """
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_checkpoint(model_dir: Path, config: Mapping[str, Any], seed: int) -> None:
    """Write config.json and seeded random weights in Hugging Face Llama naming."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_llama_weights(config, seed), str(model_dir / "model.safetensors"))


def random_llama_weights(config: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Weights for a transformers Llama config (parsed JSON: numbers)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    num_heads = int(config["num_attention_heads"])
    num_kv_heads = int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or hidden // num_heads)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(num_heads * head_dim, hidden, std=0.08)
        weights[p + "self_attn.k_proj.weight"] = normal(num_kv_heads * head_dim, hidden, std=0.08)
        weights[p + "self_attn.v_proj.weight"] = normal(num_kv_heads * head_dim, hidden, std=0.08)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, num_heads * head_dim, std=0.08)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden, std=0.08)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden, std=0.08)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter, std=0.05)
        weights[p + "input_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
        weights[p + "post_attention_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
    weights["model.norm.weight"] = 1.0 + normal(hidden, std=0.1)
    # A wide lm_head keeps the top logits well apart, so greedy choices are not near-ties
    # that float rounding could flip between implementations. Rows of printable ASCII
    # are much wider than the rest, so the model babbles readable characters.
    row_std = torch.full((vocab, 1), 0.02)
    row_std[ord(" ") : ord("~") + 1] = 0.3
    row_std[ord("\n")] = 0.3
    weights["lm_head.weight"] = normal(vocab, hidden, std=1.0) * row_std
    return weights


def byte_level_tokenizer() -> HFTokenizer:
    """One token per byte (ids 0-255) plus <s> and </s>; nothing is ever out of vocabulary."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # Order the 256 byte symbols by the byte they stand for, so token id == byte value.
    ordered = sorted(byte_chars, key=_byte_of_symbol)
    vocab = {symbol: i for i, symbol in enumerate(ordered)}
    vocab["<s>"] = BOS_TOKEN_ID
    vocab["</s>"] = EOS_TOKEN_ID
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _byte_of_symbol(symbol: str) -> int:
    """Invert the GPT-2 byte-to-printable-character table that ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(symbol)
    if code in printable:
        return code
    # Bytes outside the printable ranges are shifted to 256 + n, in byte order.
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]
