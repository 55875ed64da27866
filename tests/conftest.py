from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Test helpers (checkpoints.py) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
# A private cache for the built-in model, so tests never depend on the user's cache.
os.environ.setdefault("TWOLANE_CACHE_DIR", str(Path(__file__).parent.parent / ".cache" / "test"))
# Test models are tiny, and the servers the integration tests start share the cores with
# this process: one intra-op thread each avoids parallel ops stalling on a busy core.
torch.set_num_threads(1)
os.environ.setdefault("TWOLANE_THREADS", "1")
# Servers the tests start run the tiny built-in model unless a test asks for another:
# the default, SmolLM2, has its own tests.
os.environ.setdefault("TWOLANE_MODEL", "builtin")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from checkpoints import make_llama

    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from checkpoints import make_qwen2

    return make_qwen2(tmp_path_factory.mktemp("qwen2"))
