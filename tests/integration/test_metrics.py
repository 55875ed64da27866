"""The metrics port of a real server: per-lane and vLLM-style series with a model_name
label, gauges that are current, batch-lane figures, probes, and the Grafana dashboard's
queries against a live scrape."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2

from .nats_fixtures import job_request, wait_for_states
from .serving import ServerProcess, start_server

_METRICS_PORT = re.compile(r"metrics_port=(\d+)")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "twolane.json"


@pytest.fixture(scope="module")
def metrics_server() -> Iterator[ServerProcess]:
    server = start_server("--metrics-port", "0")
    yield server
    server.stop()


def metrics_url(server: ServerProcess, path: str = "/metrics") -> str:
    match = _METRICS_PORT.search(server.log_text())
    assert match, f"no metrics line in the log:\n{server.log_text()}"
    return f"http://127.0.0.1:{match.group(1)}{path}"


def scrape(server: ServerProcess) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(metrics_url(server), timeout=10) as response:
        text = response.read().decode()
    return [
        (name, dict(_LABEL.findall(labels or "")), float(value))
        for name, labels, value in _SAMPLE.findall(text)
    ]


def sample(samples: list, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


async def generate_twice(server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(2):
            await stub.Generate(
                generate_pb2.GenerateRequest(
                    prompt="hello",
                    params=generate_pb2.SamplingParams(max_tokens=3, ignore_eos=True),
                )
            )


async def test_requests_show_up_per_lane_and_in_the_vllm_style_series(
    metrics_server: ServerProcess,
) -> None:
    # This module's own server: nothing else has generated tokens on it before.
    await generate_twice(metrics_server)
    samples = scrape(metrics_server)
    lane = {"lane": "interactive", "model_name": "builtin"}
    assert sample(samples, "twolane_output_tokens_total", **lane) == 6
    assert sample(samples, "twolane_time_to_first_token_seconds_count", **lane) >= 2
    assert sample(samples, "twolane_e2e_request_latency_seconds_count", **lane) >= 2
    assert sample(samples, "twolane_generation_tokens_total", model_name="builtin") == 6
    assert sample(samples, "twolane_prompt_tokens_total", model_name="builtin") == 10
    queries = sample(samples, "twolane_prefix_cache_queries_total", model_name="builtin")
    hits = sample(samples, "twolane_prefix_cache_hits_total", model_name="builtin")
    assert queries == 10 and 0 <= hits <= queries
    # Each arrived at an idle engine, which starts new interactive requests in a step of
    # their own before the next regular one.
    assert sample(samples, "twolane_urgent_starts_total", model_name="builtin") == 2
    # Every series names the model.
    twolane = [(n, ls) for n, ls, _ in samples if n.startswith("twolane_")]
    assert twolane and all(ls.get("model_name") == "builtin" for _, ls in twolane), [
        n for n, ls in twolane if "model_name" not in ls
    ]


async def test_gauges_are_current_once_requests_finish(metrics_server: ServerProcess) -> None:
    """Not at the start of the next step: with nothing to do, there may be none."""
    await generate_twice(metrics_server)
    samples = scrape(metrics_server)
    for lane in ("interactive", "batch"):
        assert sample(samples, "twolane_running", lane=lane) == 0
        assert sample(samples, "twolane_waiting", lane=lane) == 0
    assert sample(samples, "twolane_kv_cache_usage_perc") == 0
    async with grpc.aio.insecure_channel(metrics_server.address) as channel:
        stats = await inference_pb2_grpc.InferenceServiceStub(channel).GetStats(
            inference_pb2.GetStatsRequest()
        )
    assert sample(samples, "twolane_kv_free_blocks") == stats.num_total_blocks


async def test_the_batch_lane_reports_backlog_endings_and_times(
    metrics_server: ServerProcess,
) -> None:
    async with grpc.aio.insecure_channel(metrics_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        job_id = (await stub.SubmitJob(job_request("counted"))).job_id
        await wait_for_states(stub, [job_id], frozenset({jobs_pb2.JOB_STATE_SUCCEEDED}))
        stats = await stub.GetStats(inference_pb2.GetStatsRequest())
    assert [b.tier for b in stats.backlog] == ["urgent", "standard", "bulk"]
    assert stats.model_name == "builtin" and stats.num_workers == 1
    for _ in range(100):  # the job runner polls JetStream every 2 s: wait for a fresh poll
        samples = scrape(metrics_server)
        pending = [v for n, ls, v in samples if n == "twolane_jobs_pending"]
        if pending and not any(pending):
            break
        await asyncio.sleep(0.1)
    assert sample(samples, "twolane_jobs_finished_total", state="succeeded") >= 1
    assert sample(samples, "twolane_job_queue_time_seconds_count", tier="standard") >= 1
    assert sample(samples, "twolane_job_run_time_seconds_count", tier="standard") >= 1
    assert sample(samples, "twolane_jobs_pending", tier="standard") == 0
    assert sample(samples, "twolane_jobs_dead_letters") == 0
    assert sample(samples, "twolane_jobs_oldest_queued_age_seconds") == 0


def test_probes_answer_and_every_other_path_is_not_found(metrics_server: ServerProcess) -> None:
    for path in ("/livez", "/readyz"):
        with urllib.request.urlopen(metrics_url(metrics_server, path), timeout=10) as response:
            assert response.status == 200
    for path in ("/", "/metrics/x", "/healthz", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(metrics_url(metrics_server, path), timeout=10)
        assert info.value.code == 404


async def test_every_metric_the_dashboard_queries_is_in_a_live_scrape(
    metrics_server: ServerProcess,
) -> None:
    await generate_twice(metrics_server)
    async with grpc.aio.insecure_channel(metrics_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        job_id = (await stub.SubmitJob(job_request("for the dashboard"))).job_id
        await wait_for_states(stub, [job_id])
    queried = set(re.findall(r"twolane_[a-z0-9_]+", json.dumps(json.loads(DASHBOARD.read_text()))))
    assert len(queried) >= 15
    for _ in range(100):
        exported = {name for name, _, _ in scrape(metrics_server)}
        if queried <= exported:
            break
        await asyncio.sleep(0.1)
    assert queried <= exported, sorted(queried - exported)


def test_status_shows_the_engine_the_lanes_and_the_backlog(metrics_server: ServerProcess) -> None:
    import subprocess

    from .serving import TWOLANE

    result = subprocess.run(
        [TWOLANE, "status", "--target", metrics_server.address],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "serving; model builtin; 1 worker(s)" in out
    for row in ("interactive lane", "batch lane", "KV cache", "backlog urgent", "backlog bulk"):
        assert row in out, out
    assert "dead letters" in out and "queue serving" in out
