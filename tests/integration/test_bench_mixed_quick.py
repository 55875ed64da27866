"""`bench/mixed.py --quick` runs both lanes end to end and accounts for every job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_mixed_bench_reports_both_runs_and_loses_no_job(tmp_path: Path) -> None:
    out_path = tmp_path / "mixed.json"
    command = [sys.executable, "-m", "twolane.bench.mixed", "--model", "builtin", "--quick"]
    out = subprocess.run(
        [*command, "--out", str(out_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "p99 ratio" in out.stdout
    report = json.loads(out_path.read_text())
    batch = report["batch"]
    assert batch["num_jobs"] >= 60
    assert batch["num_succeeded"] == batch["num_events"] == batch["num_jobs"]
    assert batch["num_duplicate_events"] == 0 and report["jobs_lost"] == 0
    assert batch["output_tokens_per_s"] > 0
    for run in ("alone", "mixed"):
        summary = report[run]
        assert summary["num_completed"] == summary["num_requests"] >= 20, run
        ttft = summary["ttft_s"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"], run
    assert report["capacity"]["output_tokens_per_s"] > 0 and report["ttft_p99_ratio"] > 0
