"""GGUF tensors: every supported type dequantizes to gguf's own values; bad files fail cleanly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from gguf_files import write_raw_tensors, write_tiny_gguf

from twolane.models.errors import GGUFError
from twolane.models.gguf import convert_gguf, read_gguf_tensors

ROWS, COLS = 6, 512  # K-quant blocks hold 256 values, the others 32
# Types gguf can quantize, and how far the round trip may move a value (sanity only:
# the exact check is against gguf's dequantizer).
QUANTIZABLE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.3, Q.Q4_1: 0.3}
# K-quants gguf can only dequantize: (bytes per 256-value block, where its fp16 scales sit).
K_QUANT_BLOCKS = {Q.Q4_K: (144, (0, 4)), Q.Q5_K: (176, (0, 4)), Q.Q6_K: (210, (208, 210))}


def synthetic_values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, COLS)).astype(np.float32)


def k_quant_blocks(qtype: Q, seed: int) -> np.ndarray:
    """Random packed blocks with finite fp16 scales (random scale bits could be NaN/inf)."""
    block_bytes, (lo, hi) = K_QUANT_BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    num_blocks = ROWS * COLS // 256
    blocks = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, size=(num_blocks, (hi - lo) // 2)).astype(np.float16)
    blocks[:, lo:hi] = scales.view(np.uint8)
    return blocks.reshape(ROWS, -1)


def stored_tensors() -> dict[str, tuple[np.ndarray, Q]]:
    tensors = {}
    for i, qtype in enumerate(QUANTIZABLE):
        tensors[f"t.{qtype.name}"] = (quantize(synthetic_values(i), qtype), qtype)
    for i, qtype in enumerate(K_QUANT_BLOCKS):
        tensors[f"t.{qtype.name}"] = (k_quant_blocks(qtype, 100 + i), qtype)
    return tensors


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_raw_tensors(tmp_path_factory.mktemp("gguf") / "types.gguf", stored_tensors())


def test_every_supported_type_equals_gguf_dequantize(every_type_file: Path) -> None:
    ours = dict(read_gguf_tensors(every_type_file))
    stored = stored_tensors()
    assert set(ours) == set(stored)
    for name, (raw, qtype) in stored.items():
        expected = dequantize(raw, qtype)
        assert ours[name].dtype == np.float32 and ours[name].shape == (ROWS, COLS), name
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def test_quantized_values_stay_near_the_originals(every_type_file: Path) -> None:
    ours = dict(read_gguf_tensors(every_type_file))
    for i, (qtype, atol) in enumerate(QUANTIZABLE.items()):
        values = synthetic_values(i)
        error = np.abs(ours[f"t.{qtype.name}"] - values).max()
        assert error <= atol * np.abs(values).max(), qtype.name


def test_unsupported_type_names_the_tensor_and_its_type(tmp_path: Path) -> None:
    raw = quantize(synthetic_values(0), Q.Q5_0)
    path = write_raw_tensors(tmp_path / "q5_0.gguf", {"blk.0.ffn_up.weight": (raw, Q.Q5_0)})
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_up\.weight' has type Q5_0"):
        dict(read_gguf_tensors(path))


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "llama")
    return path.read_bytes()


@pytest.mark.parametrize("keep_fraction", [0.0005, 0.01, 0.3, 0.999])
def test_truncated_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf_bytes: bytes, keep_fraction: float
) -> None:
    # Cut inside the metadata, the vocabulary, the tensor data and its very last bytes.
    monkeypatch.setenv("TWOLANE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf_bytes[: max(8, int(len(tiny_gguf_bytes) * keep_fraction))])
    with pytest.raises(GGUFError) as info:
        convert_gguf(path)
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message
    assert "\n" not in message
    assert not any((tmp_path / "cache").glob("*/model.safetensors"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty, not a GGUF file"),
        (b"PK\x03\x04 a zip file, say" * 10, "is not a GGUF file"),
        (b"GGUF\x07\x00\x00\x00" + bytes(64), "is GGUF version 7; supported: 2, 3"),
        (b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4, "truncated or corrupt"),
    ],
)
def test_garbage_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, expected: str
) -> None:
    monkeypatch.setenv("TWOLANE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=expected) as info:
        convert_gguf(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
