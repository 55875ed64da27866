"""Load a Hugging Face checkpoint directory into the engine's model."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open

from twolane.models.config import ModelConfig
from twolane.models.errors import CheckpointError, CheckpointFileMissingError
from twolane.models.llama import DecoderLayer, LlamaForCausalLM, RotaryEmbedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A safetensors file starts with the byte length of its JSON header (little-endian u64).
SAFETENSORS_LENGTH_BYTES = 8
# Far above any real header (names, dtypes, shapes, offsets); a bigger one is garbage.
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20


def validate_checkpoint_dir(model_dir: Path, need_tokenizer: bool = True) -> None:
    """Check that `model_dir` holds a loadable checkpoint before anything is loaded from it.

    Raises:
        CheckpointFileMissingError: config.json, tokenizer.json or the weights are missing.
        CheckpointError: config.json is not JSON, or a weights file is truncated or is not
            a safetensors file.
    """
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointFileMissingError(f"no config.json in {model_dir}")
    try:
        json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if need_tokenizer and not (model_dir / "tokenizer.json").is_file():
        raise CheckpointFileMissingError(f"no tokenizer.json in {model_dir}")
    for path in safetensors_files(model_dir):
        check_safetensors_file(path)


def check_safetensors_file(path: Path) -> None:
    """Check a safetensors file's header and that the file is as long as the header says.

    Raises:
        CheckpointFileMissingError: the file does not exist.
        CheckpointError: the file is truncated or is not a safetensors file.
    """
    if not path.is_file():
        raise CheckpointFileMissingError(f"weights file {path} does not exist")
    size_bytes = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(SAFETENSORS_LENGTH_BYTES)
        if len(prefix) < SAFETENSORS_LENGTH_BYTES:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file ({size_bytes} bytes)"
            )
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(size_bytes - SAFETENSORS_LENGTH_BYTES, MAX_SAFETENSORS_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file "
                f"(header of {header_bytes} bytes in a file of {size_bytes})"
            )
        try:
            header = json.loads(f.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)")
    data_bytes = size_bytes - SAFETENSORS_LENGTH_BYTES - header_bytes
    needed_bytes = (
        max(_tensor_end(name, info, path) for name, info in header.items()) if header else 0
    )
    if needed_bytes > data_bytes:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {needed_bytes} data bytes, it has {data_bytes}"
        )


def _tensor_end(name: str, info: object, path: Path) -> int:
    if name == "__metadata__":
        return 0
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    ):
        raise CheckpointError(f"{path} is not a safetensors file (bad entry for {name!r})")
    return int(offsets[1])


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: the ones its index names, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointFileMissingError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def native_bf16_matmuls() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles).

    Without them torch's bfloat16 GEMM runs several times slower than its float32 one
    (measured on AVX2: 9-10 against 47-67 GFLOP/s per core at 64-512 rows).
    """
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def compute_dtype(dtype: str, device: str, bf16_compute: str = "auto") -> str:
    """The dtype the weights and matmuls run in, for a requested `dtype` (the KV cache's).

    `bf16_compute` decides for bfloat16 on cpu: "auto" keeps bfloat16 where the CPU has
    native bfloat16 matmuls and computes in float32 elsewhere (the KV cache stays
    bfloat16); "bfloat16" and "float32" force one or the other.
    """
    if dtype != "bfloat16" or device != "cpu" or bf16_compute == "bfloat16":
        return dtype
    if bf16_compute == "float32":
        return "float32"
    return "bfloat16" if native_bf16_matmuls() else "float32"


def load_model(
    model_dir: Path, dtype: str, device: str, max_positions: int
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model for `model_dir` and fill it from its safetensors files."""
    validate_checkpoint_dir(model_dir, need_tokenizer=False)
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = DTYPES[dtype]
    # Straight on the target device: the layers have no random initialisers (llama.Linear),
    # so this only allocates. (Built on the meta device, the model would pull torch's
    # Python references and sympy in to materialise it: a second of every engine start.)
    with torch.device(device):
        model = LlamaForCausalLM(config, max_positions)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(iter_weights(safetensors_files(model_dir)))
    model = model.to(torch_dtype)
    # Rotary tables are computed from the config, not read from the checkpoint, and stay
    # in fp32: positions past a few hundred lose precision in bf16.
    rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
    rotary = rotary.to(device)
    for layer in cast(Iterable[DecoderLayer], model.layers):
        layer.self_attn.rotary = rotary
    model.eval()
    return model, config
