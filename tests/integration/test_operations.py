"""Failing fast and telling the truth: an unreachable or frozen NATS, stale files, bad
model paths, and health that follows what is really up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twolane.v1 import inference_pb2_grpc

from .nats_fixtures import NatsServer, free_port, job_request
from .serving import TWOLANE, start_server
from .test_metrics import metrics_url

JOBS = "twolane.v1.Jobs"


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`twolane ARGV`, given a generous bound: a command that hangs fails the test."""
    return subprocess.run(
        [TWOLANE, *argv],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
    )


def closed_port_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"


@pytest.fixture
def silent_nats() -> Iterator[str]:
    """A port that accepts connections and never says a word (a NATS that hangs)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield f"nats://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    for conn in held:
        conn.close()
    listener.close()


def test_watch_gives_up_on_an_unreachable_nats_in_one_line() -> None:
    url = closed_port_url()
    result = run("watch", "some-job", "--nats-url", url, "--timeout", "2")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert url in result.stderr and "Traceback" not in result.stderr


def test_a_stale_nats_url_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "nats.url").write_text(closed_port_url() + "\n")
    result = run("watch", "some-job", "--data-dir", str(tmp_path), "--timeout", "2")
    assert result.returncode == 1
    assert "nats.url" in result.stderr and "is `twolane serve` running?" in result.stderr


def test_serve_on_an_unreachable_nats_fails_at_once_and_says_which() -> None:
    url = closed_port_url()
    result = run("serve", "--port", "0", "--nats-url", url)
    assert result.returncode == 1
    assert f"cannot reach NATS at {url}" in result.stderr
    assert "listening" not in result.stderr


def test_a_gateway_waiting_for_nats_stops_on_sigterm(silent_nats: str) -> None:
    proc = subprocess.Popen(
        [TWOLANE, "gateway", "--port", "0", "--nats-url", silent_nats],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Its signal handlers are in place before it connects; SIGTERM it while it waits on
    # the silent NATS, well within its connect timeout.
    killer = threading.Timer(60, proc.kill)  # never hang the suite on a gateway gone wrong
    killer.start()
    assert proc.stdout is not None
    early: list[str] = []
    for line in iter(proc.stdout.readline, ""):
        early.append(line)
        if "connecting to nats" in line:
            break
    killer.cancel()
    assert "connecting to nats" in early[-1], "".join(early)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "stopped before it was ready" in "".join(early) + output


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/no/such/model/dir", "no such model directory"),
        ("meta-llama/Llama-3.2-1B", "Hub id"),
    ],
)
def test_serve_says_what_is_wrong_with_a_model_path(model: str, message: str) -> None:
    data_dir = tempfile.mkdtemp(prefix="twolane-data-")
    result = run("serve", "--port", "0", "--model", model, env={"TWOLANE_DATA_DIR": data_dir})
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_serve_says_a_safetensors_file_is_truncated(tmp_path: Path) -> None:
    from twolane.models.builtin import builtin_model_dir

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model / name).write_bytes((builtin_model_dir() / name).read_bytes())
    weights = (builtin_model_dir() / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    data_dir = tempfile.mkdtemp(prefix="twolane-data-")
    result = run("serve", "--port", "0", "--model", str(model), env={"TWOLANE_DATA_DIR": data_dir})
    assert result.returncode == 1
    assert "truncated" in result.stderr and "Traceback" not in result.stderr


async def health_of(channel: grpc.aio.Channel, name: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=name)
    )
    return reply.status


def readyz(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
async def test_jobs_health_and_readyz_follow_a_frozen_nats(tmp_path: Path) -> None:
    nats_server = NatsServer(tmp_path / "nats").start()
    server = start_server("--nats-url", nats_server.url, "--metrics-port", "0")
    ready_url = metrics_url(server, "/readyz")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await health_of(channel, JOBS) == health_pb2.HealthCheckResponse.SERVING
            for _ in range(100):  # ready once the job runner, started last, is up too
                if readyz(ready_url) == 200:
                    break
                await asyncio.sleep(0.1)
            assert readyz(ready_url) == 200
            assert nats_server.proc is not None
            nats_server.proc.send_signal(signal.SIGSTOP)
            try:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SubmitJob(job_request("frozen"), timeout=30)
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert await health_of(channel, JOBS) == health_pb2.HealthCheckResponse.NOT_SERVING
                # The engine still serves: only the batch lane's health changed.
                engine = await health_of(channel, "twolane.v1.InferenceService")
                assert engine == health_pb2.HealthCheckResponse.SERVING
                for _ in range(200):  # the supervisor's own connection misses two pings
                    if readyz(ready_url) == 503:
                        break
                    await asyncio.sleep(0.1)
                assert readyz(ready_url) == 503
            finally:
                nats_server.proc.send_signal(signal.SIGCONT)
            for _ in range(300):
                if await health_of(channel, JOBS) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await health_of(channel, JOBS) == health_pb2.HealthCheckResponse.SERVING
            for _ in range(300):
                if readyz(ready_url) == 200:
                    break
                await asyncio.sleep(0.1)
            assert readyz(ready_url) == 200
    finally:
        server.stop()
        nats_server.stop()


def test_the_job_runner_runs_at_a_lower_cpu_priority() -> None:
    import json

    server = start_server("--log-json", "--job-niceness", "7")
    try:
        for _ in range(300):  # the job runner is started last
            entries = [json.loads(line) for line in server.lines if line.startswith("{")]
            if any(e.get("event") == "job worker started" for e in entries):
                break
            time.sleep(0.1)
        pids = {
            e["role"]: int(e["pid"])
            for e in entries
            if e.get("event") == "child started" and "role" in e
        }

        def niceness(pid: int) -> int:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

        assert niceness(pids["jobs"]) == niceness(pids["frontend"]) + 7
        assert niceness(pids["engine-core"]) == niceness(pids["frontend"])
    finally:
        server.stop()
