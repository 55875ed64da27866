from __future__ import annotations

import os
import sys
from collections.abc import Generator
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


# ---- a failed test shows the logs of the processes it ran with ------------------------

LOG_TAIL_LINES = 80
_done_before: dict[str, set[int]] = {}


def _started() -> list:
    serving = sys.modules.get("integration.serving")
    return list(serving.STARTED) if serving is not None else []


def pytest_runtest_setup(item: pytest.Item) -> None:
    _done_before[item.nodeid] = {id(p) for p in _started() if p.proc.poll() is not None}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """On failure, attach the tail of every server log that was live during the test:
    a failure on a loaded CI machine can then be read, not only rerun."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if call.when == "teardown":
        _done_before.pop(item.nodeid, None)
    if not report.failed or call.when != "call":
        return
    done_before = _done_before.get(item.nodeid, set())
    for process in _started():
        if id(process) in done_before:
            continue
        argv = " ".join(str(a) for a in process.proc.args[1:])
        tail = "".join(process.lines[-LOG_TAIL_LINES:])
        state = "running" if process.proc.poll() is None else f"exit {process.proc.returncode}"
        report.sections.append((f"log of `{argv}` ({state})", tail))
