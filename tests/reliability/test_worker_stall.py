"""A job runner that stalls past the ack wait (SIGSTOP, as a starved or swapping process
would) gets its running jobs redelivered by JetStream; it must not run them a second
time beside the first run, which spends deliveries and engine time on copies.
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from integration.nats_fixtures import EventRecorder, wait_for_states
from integration.serving import start_server

from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .harness import child_pids, logged
from .test_worker_restart import job_records

ACK_WAIT_S = 1.0
# Past the ack wait, yet short of the 3 s after which the runner's engine connection
# would count a silent core as dead (ZMTP heartbeats stop with the process too).
STALL_S = 2.2
# Two run at once; the rest wait, so the runner pulls again while the stalled ones run.
MAX_TOKENS = (100, 1500, 100, 100)
RUNNING = frozenset({jobs_pb2.JOB_STATE_RUNNING})


@pytest.mark.slow
async def test_a_stalled_runner_keeps_one_run_of_each_job_it_had() -> None:
    server = start_server(
        "--log-json",
        "--job-max-batch-inflight",
        "2",
        env={"TWOLANE_JOB_ACK_WAIT_S": str(ACK_WAIT_S)},
    )
    try:
        nats_url = (server.data_dir / "nats.url").read_text().strip()
        events = await EventRecorder().start(nats_url)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            job_ids = []
            for i, max_tokens in enumerate(MAX_TOKENS):
                params = generate_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
                request = generate_pb2.GenerateRequest(prompt_token_ids=[i + 1, 7], params=params)
                submitted = await stub.SubmitJob(jobs_pb2.SubmitJobRequest(request=request))
                job_ids.append(submitted.job_id)
            await wait_for_states(stub, job_ids[:2], RUNNING)
            (runner_pid,) = child_pids(server, "jobs")
            os.kill(runner_pid, signal.SIGSTOP)
            try:
                # No progress reports for over an ack wait: JetStream redelivers both.
                await asyncio.sleep(STALL_S)
            finally:
                os.kill(runner_pid, signal.SIGCONT)
            results = await wait_for_states(stub, job_ids, timeout_s=120)
        await asyncio.sleep(0.5)
        records = await job_records(nats_url, job_ids)
        await events.close()
    finally:
        server.stop()
    assert {r.state for r in results.values()} == {jobs_pb2.JOB_STATE_SUCCEEDED}
    assert [len(results[j].result.token_ids) for j in job_ids] == list(MAX_TOKENS)
    assert [events.count(j) for j in job_ids] == [1] * len(job_ids)
    # The long job was still running when its redelivery was pulled: one run, not two.
    assert [r.attempts for r in records] == [1] * len(job_ids)
    assert logged(server, "job redelivered while it runs here; the run goes on")
