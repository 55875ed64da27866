"""Small GGUF files written with `gguf.GGUFWriter`, laid out the way llama.cpp's converter does.

A tiny byte-level BPE vocabulary and tiny random Llama / Qwen2 models from transformers,
so conversion can be checked against the original weights and against transformers'
own GGUF loader.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import pre_tokenizers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED_TOKENS = ["<think>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "1 2", "Ġ Ġ"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Special tokens, the 256 byte symbols, one token per merge, a user-defined token."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIAL_TOKENS + byte_symbols + merged + USER_DEFINED_TOKENS
    types = (
        [TOKEN_CONTROL] * len(SPECIAL_TOKENS)
        + [TOKEN_NORMAL] * (len(byte_symbols) + len(merged))
        + [TOKEN_USER_DEFINED] * len(USER_DEFINED_TOKENS)
    )
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, pre: str, add_bos: bool = False) -> None:
    tokens, types = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHATML_TEMPLATE)


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """The q/k row order llama.cpp's converter writes: each head's two rotary halves
    interleaved, row `h*D + j*D/2 + i` of the Hugging Face weight going to `h*D + 2*i + j`."""
    head_dim = weights.shape[0] // num_heads
    halves = weights.reshape(num_heads, 2, head_dim // 2, *weights.shape[1:])
    return np.ascontiguousarray(halves.swapaxes(1, 2)).reshape(weights.shape)


def tiny_hf_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny Llama (untied, GQA) or Qwen2 (tied, q/k/v biases) from transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {
        "vocab_size": len(tiny_vocab()[0]),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
    }
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**shape, rope_theta=50000.0, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(**shape, rope_theta=1000000.0, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name or "norm" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)  # non-trivial values
    return model.float().eval()


def write_tiny_gguf(path: Path, arch: str, seed: int = 0, pre: str | None = None) -> Path:
    """The tiny model for `arch` as llama.cpp would convert it to an all-F32 GGUF file."""
    model = tiny_hf_model(arch, seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, pre or ("qwen2" if arch == "qwen2" else "llama-bpe"))
    for name, values in gguf_tensors(model, arch).items():
        writer.add_tensor(name, values)
    _finish(writer)
    return path


def gguf_tensors(model: torch.nn.Module, arch: str) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, q/k permuted for Llama as llama.cpp does."""
    config = model.config
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    out = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    if not config.tie_word_embeddings:
        out["output.weight"] = model.lm_head.weight
    for hf_name, tensor in model.model.layers.named_parameters():
        layer, rest = hf_name.split(".", 1)
        module, kind = rest.rsplit(".", 1)
        out[f"blk.{layer}.{names[module]}.{kind}"] = tensor
    arrays = {name: t.detach().numpy().astype(np.float32) for name, t in out.items()}
    if arch == "llama":
        for name in arrays:
            if ".attn_q." in name:
                arrays[name] = llama_cpp_permute(arrays[name], config.num_attention_heads)
            elif ".attn_k." in name:
                arrays[name] = llama_cpp_permute(arrays[name], config.num_key_value_heads)
    return arrays


RawTensors = dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]


def write_raw_tensors(path: Path, tensors: RawTensors) -> Path:
    """A GGUF file holding `tensors` as given: (stored array, its GGML type)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (raw, qtype) in tensors.items():
        float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(name, raw, raw_dtype=None if qtype in float_types else qtype)
    _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
