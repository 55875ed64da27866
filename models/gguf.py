"""GGUF checkpoints (llama.cpp's format), converted once into a Hugging Face directory.

`convert_gguf(path)` reads the file with the `gguf` package (llama.cpp's own reader),
dequantizes every tensor to fp32 with its dequantizers, puts the q/k rows that llama.cpp
permutes back into Hugging Face order, maps the metadata onto a `config.json` and builds
`tokenizer.json` / `tokenizer_config.json` from the tokenizer metadata. The result is an
ordinary checkpoint directory under the cache dir, keyed by the sha256 of the file, so
the engine and transformers load it like any other, and a second start only hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from twolane.models.builtin import cache_root, cached_checkpoint
from twolane.models.config import ModelConfig, UnsupportedModelError
from twolane.models.errors import GGUFError
from twolane.models.gguf_rope import llama3_scaling_from_factors
from twolane.models.gguf_tokenizer import build_tokenizer, tokenizer_config

# Bumped whenever the converted directory changes, so stale conversions are not reused.
FORMAT_VERSION = 1
HASH_CHUNK_BYTES = 1 << 20
GGUF_MAGIC = b"GGUF"
GGUF_PREFIX_BYTES = 8  # the magic, then the format version (little-endian u32)
SUPPORTED_GGUF_VERSIONS = (2, 3)

SUPPORTED_TENSOR_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }
)
# GGUF architecture name -> the Hugging Face class whose checkpoint layout we write.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Tensors per layer, GGUF suffix -> Hugging Face suffix.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Llama 3 long-context RoPE: llama.cpp stores per-frequency divisors instead of metadata.
ROPE_FREQS_TENSOR = "rope_freqs.weight"


def convert_gguf(path: Path, cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face checkpoint directory for the GGUF file at `path`.

    The first call for a file converts it (a progress bar over tensors) into `cache_dir`
    (default: the cache dir, `cache_root()`); later calls find the directory by the file's
    content hash and return at once.

    Raises:
        GGUFError: the file is missing, unreadable, truncated, or holds an unsupported
            architecture, tensor type or tokenizer.
        UnsupportedModelError: the model it describes is not one the engine can run.
    """
    digest = file_sha256(path)
    target = (cache_dir or cache_root()) / f"gguf-v{FORMAT_VERSION}-{digest[:32]}"
    try:
        return cached_checkpoint(target, lambda model_dir: write_hf_checkpoint(path, model_dir))
    except (GGUFError, UnsupportedModelError) as e:
        # Checks deep in the metadata do not know the file; the user needs to.
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes (about 0.1 s per 100 MB here)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as e:
        raise GGUFError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    return digest.hexdigest()


def write_hf_checkpoint(path: Path, model_dir: Path) -> None:
    """Write config.json, model.safetensors (fp32) and the tokenizer files for `path`."""
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    shapes = {t.name: _hf_shape(t) for t in reader.tensors}
    config = hf_config(metadata, shapes, _rope_factors(reader))
    # Fail on an unsupported model before the slow part, not after.
    ModelConfig.from_dict(config)
    tokenizer = build_tokenizer(metadata, path)
    weights = dict(hf_weights(reader, config, path))
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_json(model_dir / "config.json", config)
    _write_json(model_dir / "generation_config.json", _generation_config(config))
    _write_json(model_dir / "tokenizer_config.json", tokenizer_config(metadata))
    tokenizer.save(str(model_dir / "tokenizer.json"))
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def open_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file, turning whatever the parser trips on into one clean `GGUFError`."""
    try:
        with path.open("rb") as f:
            start = f.read(GGUF_PREFIX_BYTES)
        size_bytes = path.stat().st_size
    except OSError as e:
        raise GGUFError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if not start:
        raise GGUFError(f"{path} is empty, not a GGUF file")
    if not start.startswith(GGUF_MAGIC):
        raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    if len(start) == GGUF_PREFIX_BYTES:
        version = int.from_bytes(start[len(GGUF_MAGIC) :], "little")
        if version not in SUPPORTED_GGUF_VERSIONS:
            raise GGUFError(f"{path} is GGUF version {version}; supported: 2, 3")
    try:
        return GGUFReader(path)
    # The reader parses untrusted bytes and fails in many ways (a short read shows up as a
    # reshape or index error deep in numpy); for the caller they all mean a broken file.
    except Exception as e:
        raise GGUFError(
            f"{path} is truncated or corrupt: the GGUF reader failed on its {size_bytes} bytes"
        ) from e


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata key with its value (strings, numbers, bools and lists of them)."""
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise GGUFError(f"GGUF metadata is corrupt: {_one_line(e)}") from None


def read_gguf_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor of the file, by its GGUF name, dequantized to fp32 in row-major layout."""
    for tensor in open_gguf(path).tensors:
        yield tensor.name, dequantize_tensor(tensor, path)


def dequantize_tensor(tensor: ReaderTensor, path: Path) -> np.ndarray:
    """fp32 values of one tensor, shaped like the Hugging Face weight ([out, in])."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
        raise GGUFError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which is not supported "
            f"(supported: {supported})"
        )
    values = dequantize(tensor.data, qtype)
    # F32 comes back as a read-only view of the memory-mapped file: copy it out.
    return np.array(values, dtype=np.float32, copy=True).reshape(_hf_shape(tensor))


def hf_config(
    metadata: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    rope_factors: np.ndarray | None = None,
) -> dict[str, Any]:
    """A Hugging Face `config.json` for the model the metadata describes."""
    arch = _architecture(metadata)

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata has no {arch}.{name}")
        return value

    num_heads = int(key("attention.head_count"))
    hidden_size = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden_size // num_heads))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    rope_theta = _shortest(key("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _vocab_size(metadata, shapes),
        "hidden_size": hidden_size,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _shortest(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, arch, rope_factors, head_dim, rope_theta),
        "hidden_act": "silu",
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        # Qwen2 configs carry a sliding window that its checkpoints leave switched off.
        config["use_sliding_window"] = False
    return config


def hf_weights(
    reader: GGUFReader, config: Mapping[str, Any], path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face named fp32 weights, with a progress bar over the file's tensors."""
    num_heads = int(config["num_attention_heads"])
    num_kv_heads = int(config["num_key_value_heads"])
    # Only llama.cpp's Llama converter permutes q/k (for its interleaved RoPE); Qwen2 is
    # stored in Hugging Face order.
    unpermute = config["model_type"] == "llama"
    bar = tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor", disable=None)
    for tensor in bar:
        if tensor.name == ROPE_FREQS_TENSOR:
            continue  # folded into config.json's rope_scaling
        hf_name = hf_tensor_name(tensor.name)
        values = dequantize_tensor(tensor, path)
        if unpermute and ".attn_q." in tensor.name:
            values = unpermute_rope_rows(values, num_heads)
        elif unpermute and ".attn_k." in tensor.name:
            values = unpermute_rope_rows(values, num_kv_heads)
        yield hf_name, torch.from_numpy(values)


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name for a GGUF tensor name (`blk.3.attn_q.weight` -> ...q_proj...)."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no place in a Llama-family model")


def unpermute_rope_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows (weights or biases).

    Hugging Face keeps each head's rotary pairs as (first half, second half) of the head;
    llama.cpp's converter interleaves them, so that HF row `h*D + j*D/2 + i` (j in {0, 1})
    is stored at row `h*D + 2*i + j`. Reading the stored rows as [head, i, j] and swapping
    the last two axes gives [head, j, i], which is the HF order again.
    """
    rows = values.shape[0]
    head_dim = rows // num_heads
    rest = values.shape[1:]
    by_pair = values.reshape(num_heads, head_dim // 2, 2, *rest)
    return np.ascontiguousarray(by_pair.swapaxes(1, 2)).reshape(values.shape)


def _architecture(metadata: Mapping[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return str(arch)


def _vocab_size(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> int:
    # The embedding's row count is what the weights need; older files lack `vocab_size`.
    embedding = shapes.get("token_embd.weight")
    if embedding is None:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    return embedding[0]


def _rope_scaling(
    metadata: Mapping[str, Any],
    arch: str,
    rope_factors: np.ndarray | None,
    head_dim: int,
    rope_theta: float,
) -> dict[str, Any] | None:
    if rope_factors is not None:
        return llama3_scaling_from_factors(rope_factors, head_dim, rope_theta)
    rope_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if rope_type == "none":
        return None
    # Written out as the file says, so that ModelConfig names what it does not support.
    scaling: dict[str, Any] = {"rope_type": rope_type}
    if (factor := metadata.get(f"{arch}.rope.scaling.factor")) is not None:
        scaling["factor"] = float(factor)
    if (original := metadata.get(f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _rope_factors(reader: GGUFReader) -> np.ndarray | None:
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS_TENSOR:
            return dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type)).ravel()
    return None


def _shortest(value: float) -> float:
    # Metadata floats are fp32: 1e-5 reads back as 9.999999747e-06. The shortest decimal
    # that rounds to the same fp32 is the value the original config.json had.
    return float(str(np.float32(value)))


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first; row-major layout wants them outermost first.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]
