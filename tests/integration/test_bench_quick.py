"""`twolane bench --quick` runs end to end and reports; its speed is never asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .serving import TWOLANE


def assert_ordered_percentiles(dist: dict[str, float]) -> None:
    assert 0 <= dist["p50"] <= dist["p90"] <= dist["p99"]


@pytest.mark.slow
def test_quick_bench_serves_every_request_and_reports_both_baselines(tmp_path: Path) -> None:
    out = subprocess.run(
        [TWOLANE, "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "HF static batching" in out.stdout
    assert "HF generate, one at a time" in out.stdout
    assert (tmp_path / "report.png").stat().st_size > 0

    report = json.loads((tmp_path / "report.json").read_text())
    (run,) = report["runs"]
    num_requests = run["workload"]["num_requests"]
    for system in ("twolane", "twolane_http", "hf_static", "hf_sequential"):
        summary = run[system]
        assert summary["num_completed"] == num_requests, system
        assert summary["output_tokens_per_s"] > 0
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert_ordered_percentiles(summary[metric])
    lane = run["batch_lane"]
    assert lane["num_succeeded"] == lane["num_jobs"] > 0
    assert "twolane (HTTP /v1/completions, SSE)" in out.stdout
    assert set(run["ratios"]) >= {
        "throughput_vs_sequential",
        "throughput_vs_static",
        "http_vs_grpc_tokens",
    }
    assert all(ratio > 0 for ratio in run["ratios"].values())
    roofline = run["roofline"]
    assert roofline["matmul_flops_per_s"] > 0 and roofline["read_bytes_per_s"] > 0
    assert all(d["fraction"] > 0 for d in roofline["decode"])
