"""A job runner killed mid-job comes back as the same worker and takes its jobs back at once.

The ack wait is ten minutes here, so the only way the orphaned jobs can finish within the
test is the restarted runner giving them back (a NAK per message it held) as it starts.
How long that took, from the restart to the jobs starting and finishing again, goes to
the report.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import nats
import pytest
from integration.nats_fixtures import EventRecorder, wait_for_states
from integration.serving import start_server

from twolane.v1 import generate_pb2, inference_pb2_grpc, job_record_pb2, jobs_pb2

from .conftest import Report
from .harness import child_pids, kill, logged, logged_at_s

NUM_JOBS = 4
MAX_TOKENS = 800  # long enough to be mid-run when its runner is killed
RUNNING = frozenset({jobs_pb2.JOB_STATE_RUNNING})


async def job_records(nats_url: str, job_ids: list[str]) -> list[job_record_pb2.JobRecord]:
    nc = await nats.connect(nats_url)
    try:
        bucket = await nc.jetstream().key_value("twolane_jobs")
        return [
            job_record_pb2.JobRecord.FromString((await bucket.get(j)).value or b"") for j in job_ids
        ]
    finally:
        await nc.close()


@pytest.mark.slow
async def test_a_restarted_job_runner_takes_its_orphaned_jobs_back_at_once(
    report: Report,
) -> None:
    server = start_server("--log-json", env={"TWOLANE_JOB_ACK_WAIT_S": "600"})
    try:
        nats_url = (server.data_dir / "nats.url").read_text().strip()
        events = await EventRecorder().start(nats_url)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            params = generate_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
            job_ids = [
                (
                    await stub.SubmitJob(
                        jobs_pb2.SubmitJobRequest(
                            request=generate_pb2.GenerateRequest(
                                prompt_token_ids=[i + 1, 2, 3], params=params
                            )
                        )
                    )
                ).job_id
                for i in range(NUM_JOBS)
            ]
            await wait_for_states(stub, job_ids, RUNNING)
            before = await job_records(nats_url, job_ids)
            (runner_pid,) = child_pids(server, "jobs")
            kill(runner_pid)
            killed_at_s = time.time()
            results = await wait_for_states(stub, job_ids, timeout_s=120)
        await asyncio.sleep(0.5)
        after = await job_records(nats_url, job_ids)
        await events.close()
    finally:
        server.stop()
    assert {r.state for r in results.values()} == {jobs_pb2.JOB_STATE_SUCCEEDED}
    assert all(len(r.result.token_ids) == MAX_TOKENS for r in results.values())
    assert [events.count(j) for j in job_ids] == [1] * NUM_JOBS
    # The same worker, by identity, ran each job twice: once before the kill, once after.
    assert {r.worker_id for r in before} == {r.worker_id for r in after}
    assert [r.attempts for r in after] == [2] * NUM_JOBS
    reclaimed = logged(server, "jobs reclaimed from the last run")
    assert reclaimed and reclaimed[0]["num_jobs"] == NUM_JOBS
    restarted_at_s = logged_at_s(
        [e for e in logged(server, "child started") if e["role"] == "jobs"][1]
    )
    reclaimed_at_s = logged_at_s(reclaimed[0])
    started_again_s = max(r.started_at.ToNanoseconds() / 1e9 for r in results.values())
    finished_s = max(r.finished_at.ToNanoseconds() / 1e9 for r in results.values())
    figures = dict(
        kill_to_restart_s=round(restarted_at_s - killed_at_s, 2),
        reclaim_to_jobs_started_s=round(started_again_s - reclaimed_at_s, 2),
        restart_to_jobs_started_s=round(started_again_s - restarted_at_s, 2),
        restart_to_jobs_finished_s=round(finished_s - restarted_at_s, 2),
    )
    print(f"job runner restart: {figures}")
    report.record("recovery", **figures)
