"""The engine core SIGKILLed mid-stream: health tells, calls fail fast, jobs finish once,
and the supervisor brings the core back with no hand on it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .nats_fixtures import EventRecorder, job_request, wait_for_states
from .serving import ServerProcess, start_server

SERVICE = "twolane.v1.InferenceService"
LONG = generate_pb2.SamplingParams(max_tokens=2000, ignore_eos=True)


def child_pids(server: ServerProcess, role: str) -> list[int]:
    """Pids of the children of `role` the supervisor started, in order (JSON logs)."""
    pids = []
    for line in server.lines:
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "child started" and entry.get("role") == role:
                pids.append(int(entry["pid"]))
    return pids


def logged(server: ServerProcess, event: str) -> list[dict]:
    entries = [json.loads(line) for line in server.lines if line.startswith("{")]
    return [e for e in entries if e.get("event") == event]


async def health_status(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    return reply.status


@pytest.mark.slow
async def test_a_killed_engine_core_fails_calls_fast_and_comes_back_with_jobs_done_once() -> None:
    # A short ack wait, so that a redelivery would show up within the test if a job ran twice.
    server = start_server("--log-json", env={"TWOLANE_JOB_ACK_WAIT_S": "3"})
    try:
        nats_url = (server.data_dir / "nats.url").read_text().strip()
        events = await EventRecorder().start(nats_url)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            jobs = [
                (await stub.SubmitJob(job_request(f"job {i}", max_tokens=300))).job_id
                for i in range(6)
            ]
            await wait_for_states(stub, jobs[:1], frozenset({jobs_pb2.JOB_STATE_RUNNING}))
            stream = stub.GenerateStream(
                generate_pb2.GenerateStreamRequest(prompt="keep going", params=LONG)
            )
            assert (await stream.read()).token_ids

            (core_pid,) = child_pids(server, "engine-core")
            os.kill(core_pid, signal.SIGKILL)
            killed_s = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:
                    await stream.read()
            failed_after_s = time.monotonic() - killed_s
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            # The call failed on the core's death, not on its return: no new core yet.
            assert len(logged(server, "engine core ready")) == 1
            assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            print(f"stream failed {failed_after_s * 1000:.0f} ms after the kill")

            # The supervisor starts a new core; service resumes by itself.
            for _ in range(600):
                if await health_status(channel) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert len(child_pids(server, "engine-core")) == 2
            reply = await stub.Generate(
                generate_pb2.GenerateRequest(
                    prompt="back", params=generate_pb2.SamplingParams(max_tokens=3)
                )
            )
            assert len(reply.token_ids) == 3

            results = await wait_for_states(stub, jobs, timeout_s=180)
            assert {r.state for r in results.values()} == {jobs_pb2.JOB_STATE_SUCCEEDED}
            assert all(len(r.result.token_ids) == 300 for r in results.values())
            await asyncio.sleep(1.0)
            assert [events.count(j) for j in jobs] == [1] * len(jobs)
        await events.close()
        # The job runner gave its running jobs back with a delay, not in a hot loop.
        given_back = logged(server, "job given back")
        assert given_back and all(e["retry_in_s"] >= 1 for e in given_back)
        assert logged(server, "engine gone; no jobs pulled until it is back")
        restarts = [
            e for e in logged(server, "child died; restarting") if e["role"] == "engine-core"
        ]
        assert len(restarts) == 1 and restarts[0]["restart_in_s"] > 0
    finally:
        server.stop()
