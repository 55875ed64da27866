"""A real nats-server process for batch-lane tests, and helpers to read its streams."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import pytest
from nats.aio.client import Client as NATS

from twolane.services.nats_embedded import nats_server_binary
from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .serving import TWOLANE, ServerProcess

FINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCEEDED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED,
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NatsServer:
    """`nats-server -js -sd STORE` on a fixed loopback port, restartable on the same store."""

    store_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-js",
                "-sd",
                str(self.store_dir),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        give_up_at = time.monotonic() + 30
        while time.monotonic() < give_up_at:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        pytest.fail("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_process(
    *argv: str, env: dict[str, str] | None = None, wait: bool = True
) -> ServerProcess:
    """Start `twolane ARGV` and wait for its `listening` line (unless not `wait`: then
    call `wait_listening` later, so that several processes start side by side)."""
    proc = subprocess.Popen(
        [TWOLANE, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    server = ServerProcess(proc)
    threading.Thread(target=server._read_output, daemon=True).start()
    if wait:
        server.wait_listening()
    return server


def job_request(
    prompt: str,
    max_tokens: int = 8,
    tier: jobs_pb2.JobTier.ValueType = jobs_pb2.JOB_TIER_STANDARD,
    idempotency_key: str = "",
    custom_id: str = "",
) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        request=generate_pb2.GenerateRequest(
            prompt=prompt,
            params=generate_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        ),
        tier=tier,
        idempotency_key=idempotency_key,
        custom_id=custom_id,
    )


async def wait_for_states(
    stub: inference_pb2_grpc.InferenceServiceStub,
    job_ids: Iterable[str],
    states: frozenset[int] = FINAL_STATES,
    timeout_s: float = 120.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, jobs_pb2.GetResultResponse]:
    """Poll GetResult until every job is in one of `states`; fail the test otherwise."""
    pending = set(job_ids)
    results: dict[str, jobs_pb2.GetResultResponse] = {}
    give_up_at = time.monotonic() + timeout_s
    while pending:
        for job_id in list(pending):
            try:
                response = await stub.GetResult(
                    jobs_pb2.GetResultRequest(job_id=job_id), metadata=metadata
                )
            except grpc.aio.AioRpcError as err:
                if err.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
                continue
            if response.state in states:
                results[job_id] = response
                pending.discard(job_id)
        if pending:
            if time.monotonic() > give_up_at:
                pytest.fail(f"{len(pending)} jobs never reached {sorted(states)}")
            await asyncio.sleep(0.1)
    return results


class EventRecorder:
    """Every message on `twolane.results.>`, as a plain (core NATS) subscriber sees it."""

    def __init__(self) -> None:
        self.events: list[jobs_pb2.JobEvent] = []
        self.nc: NATS | None = None

    async def start(self, url: str) -> EventRecorder:
        self.nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

        async def record(msg: nats.aio.msg.Msg) -> None:
            self.events.append(jobs_pb2.JobEvent.FromString(msg.data))

        await self.nc.subscribe("twolane.results.>", cb=record)
        await self.nc.flush()
        return self

    def count(self, job_id: str) -> int:
        return sum(1 for event in self.events if event.job_id == job_id)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


async def stream_last_seq(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.last_seq)
    finally:
        await nc.close()
