"""Prometheus metrics over HTTP, per lane."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from twolane.v1 import generate_pb2, inference_pb2_grpc

from .serving import ServerProcess, start_server

_METRICS_PORT = re.compile(r"metrics_port=(\d+)")


@pytest.fixture(scope="module")
def metrics_server() -> Iterator[ServerProcess]:
    server = start_server("--metrics-port", "0")
    yield server
    server.stop()


def scrape(server: ServerProcess) -> str:
    match = _METRICS_PORT.search(server.log_text())
    assert match, f"no metrics line in the log:\n{server.log_text()}"
    with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    braces = rf"\{{{re.escape(label_text)}\}}" if labels else ""
    pattern = re.compile(rf"^{re.escape(name)}{braces} (\S+)$", re.MULTILINE)
    match = pattern.search(text)
    assert match, f"{name}{{{label_text}}} not exported"
    return float(match.group(1))


async def test_interactive_requests_show_up_in_the_lane_metrics(
    metrics_server: ServerProcess,
) -> None:
    # This module's own server: nothing else has generated tokens on it.
    async with grpc.aio.insecure_channel(metrics_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(2):
            await stub.Generate(
                generate_pb2.GenerateRequest(
                    prompt="hello",
                    params=generate_pb2.SamplingParams(max_tokens=3, ignore_eos=True),
                )
            )
    text = scrape(metrics_server)
    assert sample(text, "twolane_output_tokens_total", lane="interactive") == 6
    assert sample(text, "twolane_time_to_first_token_seconds_count", lane="interactive") >= 2
    assert sample(text, "twolane_running", lane="batch") == 0
    assert "twolane_kv_free_blocks" in text
    # Each arrived at an idle engine, which starts new interactive requests in a step of
    # their own before the next regular one.
    assert sample(text, "twolane_urgent_starts_total") == 2
