"""The reliability suite: fixtures, and the report its figures go to.

`make test` runs the suite at its short size: every defect's test, and a small share of
the fuzz cases and client faults (seconds to a minute each). The soak (10,000 fuzz
cases, 1,000 client faults, the load, fault and overload runs, the full drain) runs with
`TWOLANE_SOAK=1`, which `make test-reliability` sets; tests marked `soak` run only then.

Each test records what it measured (`report.record(...)`); at the end of the run the
figures are printed as the README's "Reliability" table and written to
`.cache/reliability/report.json`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.serving import ServerProcess, start_server

from .harness import reference_tokens

SOAK = os.environ.get("TWOLANE_SOAK", "") not in ("", "0")
MAX_JOBS = 2000  # the most jobs one run of the suite submits
REPORT_PATH = Path(__file__).resolve().parents[2] / ".cache" / "reliability" / "report.json"


def soak_or(soak: int, short: int) -> int:
    """A run's size: `soak` under TWOLANE_SOAK=1, else `short`."""
    return soak if SOAK else short


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SOAK:
        return
    skip = pytest.mark.skip(reason="a soak run: make test-reliability (TWOLANE_SOAK=1)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


class Report:
    """Figures by section, e.g. record("fuzz", cases=10400)."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {}
        self.started_s = time.monotonic()

    def record(self, section: str, **figures: Any) -> None:
        self.sections.setdefault(section, {}).update(figures)

    def add(self, section: str, **counts: int) -> None:
        figures = self.sections.setdefault(section, {})
        for name, count in counts.items():
            figures[name] = figures.get(name, 0) + count


_REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


@pytest.fixture(scope="session")
def shared_server() -> Iterator[ServerProcess]:
    """`twolane serve` on the built-in model with a short context (64 tokens), so any
    request it accepts is cheap: the fuzzer's, the client faults', the defects' tests."""
    server = start_server("--max-model-len", "64")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def job_reference() -> list[list[int]]:
    """The undisturbed run's tokens of the suite's jobs (harness.job_prompt), by index."""
    return reference_tokens(MAX_JOBS)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORT.sections:
        return
    _REPORT.record("run", wall_s=round(time.monotonic() - _REPORT.started_s, 1))
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(json.dumps(_REPORT.sections, indent=2, sort_keys=True) + "\n")
    terminalreporter.section("reliability figures")
    for section, figures in sorted(_REPORT.sections.items()):
        shown = ", ".join(f"{name}={value}" for name, value in sorted(figures.items()))
        terminalreporter.write_line(f"{section}: {shown}")
    terminalreporter.write_line(f"written to {REPORT_PATH}")
