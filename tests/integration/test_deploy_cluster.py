"""The 3-node NATS cluster of deploy/cluster forms, keeps an R3 stream through the loss
of a node, and a gateway and a worker started with the Procfile's flags (a list of its
servers, `--nats-replicas 3`) serve on it with every stream and bucket on three nodes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from twolane.services.nats_embedded import nats_server_binary
from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .nats_fixtures import free_port, job_request, start_process, wait_for_states

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "cluster"
_ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)")
_CLIENT_PORT = re.compile(r"^listen: 127\.0\.0\.1:(\d+)", re.MULTILINE)


@dataclass
class Cluster:
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    give_up_s = time.monotonic() + timeout_s
    while time.monotonic() < give_up_s:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on {port}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The example's three servers, on free ports instead of its fixed ones."""
    configs = sorted(CLUSTER.glob("nats-*.conf"))
    texts = [c.read_text() for c in configs]
    fresh = {p: str(free_port()) for text in texts for p in _ADDRESS.findall(text)}
    running = Cluster([], [])
    try:
        for config, text in zip(configs, texts, strict=True):
            (tmp_path / config.name).write_text(
                _ADDRESS.sub(lambda m: f"127.0.0.1:{fresh[m.group(1)]}", text)
            )
            match = _CLIENT_PORT.search(text)
            assert match is not None, f"{config.name} has no client listen line"
            running.urls.append(f"nats://127.0.0.1:{fresh[match.group(1)]}")
            running.procs.append(
                subprocess.Popen(
                    [nats_server_binary(), "-c", config.name],
                    cwd=tmp_path,  # the configs' store dirs are relative
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for url in running.urls:
            _wait_port(int(url.rsplit(":", 1)[1]))
        yield running
    finally:
        for proc in running.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)


async def connect_when_formed(url: str) -> NATS:
    """A connection once JetStream answers (the cluster has elected its meta leader)."""
    nc = await nats.connect(url)
    give_up_s = time.monotonic() + 30
    while True:
        try:
            await nc.jetstream().account_info()
            return nc
        except Exception:
            if time.monotonic() > give_up_s:
                await nc.close()
                raise
            await asyncio.sleep(0.2)


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[NATS]:
    nc = await connect_when_formed(cluster.urls[0])
    yield nc
    await nc.close()


async def retry(
    what: str, attempt: Callable[[], Awaitable[object]], timeout_s: float = 60.0
) -> None:
    """Repeat `attempt` until it succeeds; a cluster on a loaded machine can take a while
    to place an R3 stream (every peer must have joined) or to elect a new leader."""
    give_up_s = time.monotonic() + timeout_s
    while True:
        try:
            await attempt()
            return
        except Exception as exc:
            if time.monotonic() > give_up_s:
                pytest.fail(f"{what}; the last attempt: {exc!r}")
            await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_an_r3_stream_keeps_serving_when_a_node_stops(cluster: Cluster, client: NATS) -> None:
    js = client.jetstream()
    stream = api.StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3)
    await retry("no R3 stream on the example cluster", lambda: js.add_stream(stream))
    await js.publish("r3.a", b"before")
    info = await js.stream_info("R3")
    assert info.config.num_replicas == 3
    assert info.cluster is not None and len(info.cluster.replicas or []) == 2

    # Stop a node other than this client's; the two left are a majority.
    third = cluster.procs[2]
    third.send_signal(signal.SIGTERM)
    third.wait(15)
    await retry(
        "the stream stopped taking messages with one node down",
        lambda: js.publish("r3.b", b"after", timeout=2),
    )
    assert (await js.stream_info("R3")).state.messages == 2


@pytest.mark.slow
async def test_a_fleet_on_the_cluster_keeps_every_stream_and_bucket_on_three_nodes(
    cluster: Cluster, client: NATS
) -> None:
    """The Procfile's flags: the list of servers (the first one down) and three replicas."""
    dead = f"nats://127.0.0.1:{free_port()}"
    urls = ",".join([dead, *cluster.urls])
    gateway = start_process("gateway", "--port", "0", "--nats-url", urls, "--nats-replicas", "3")
    worker = None
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            job_id = (await stub.SubmitJob(job_request("queued on the cluster"))).job_id
            queued = frozenset({jobs_pb2.JOB_STATE_QUEUED})
            states = await wait_for_states(stub, [job_id], queued, timeout_s=10)
            assert states[job_id].state == jobs_pb2.JOB_STATE_QUEUED

            worker = start_process(
                "worker", "--port", "0", "--nats-url", urls, "--nats-replicas", "3"
            )
            states = await wait_for_states(stub, [job_id], timeout_s=60)
            assert states[job_id].state == jobs_pb2.JOB_STATE_SUCCEEDED
            # Served through the gateway once it has found the worker in the bucket.
            request = generate_pb2.GenerateRequest(
                prompt="hello", params=generate_pb2.SamplingParams(max_tokens=2)
            )
            await retry("the gateway never found the worker", lambda: stub.Generate(request))
        expected = {
            "TWOLANE_JOBS",
            "TWOLANE_RESULTS",
            "TWOLANE_DLQ",
            "KV_twolane_jobs",
            "KV_twolane_results",
            "KV_twolane_idempotency",
            "KV_twolane_workers",
            "OBJ_twolane_models",  # the worker's tokenizer
        }

        async def all_on_three_nodes() -> None:
            infos = await client.jetstream().streams_info()
            replicas = {i.config.name: i.config.num_replicas for i in infos}
            assert {name: replicas.get(name) for name in expected} == dict.fromkeys(expected, 3)

        await retry("a stream or bucket is not R3", all_on_three_nodes)
    finally:
        if worker is not None:
            worker.stop()
        gateway.stop()
