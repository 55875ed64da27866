"""Cancellation and tier order on a worker that runs one batch job at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from twolane.v1 import inference_pb2_grpc, jobs_pb2

from .nats_fixtures import EventRecorder, NatsServer, job_request, wait_for_states
from .serving import ServerProcess, start_server, wait_until_idle

LONG_TOKENS = 1800


@pytest.fixture(scope="module")
def one_job_server(nats_server: NatsServer) -> Iterator[ServerProcess]:
    server = start_server("--nats-url", nats_server.url, "--job-max-batch-inflight", "1")
    yield server
    server.stop()


@pytest.fixture
async def stub(
    one_job_server: ServerProcess,
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(one_job_server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def start_long_job(stub: inference_pb2_grpc.InferenceServiceStub) -> str:
    submitted = await stub.SubmitJob(job_request("long", max_tokens=LONG_TOKENS))
    await wait_for_states(stub, [submitted.job_id], frozenset({jobs_pb2.JOB_STATE_RUNNING}))
    return submitted.job_id


async def test_cancelled_jobs_queued_or_running_end_cancelled_and_free_their_blocks(
    stub: inference_pb2_grpc.InferenceServiceStub,
    events: EventRecorder,
    one_job_server: ServerProcess,
) -> None:
    running_id = await start_long_job(stub)
    queued_id = (await stub.SubmitJob(job_request("never runs"))).job_id

    cancelled = await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=queued_id))
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    cancelled = await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=running_id))
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED

    stats = await wait_until_idle(stub)
    assert (stats.num_running, stats.num_used_blocks) == (0, 0)
    results = await wait_for_states(stub, [queued_id, running_id])
    assert {r.state for r in results.values()} == {jobs_pb2.JOB_STATE_CANCELLED}
    assert not results[queued_id].HasField("started_at")
    assert not results[running_id].HasField("result")
    # The engine stopped the running job; it did not run to its end.
    for _ in range(100):
        if "job aborted after cancel" in one_job_server.log_text():
            break
        await asyncio.sleep(0.05)
    log_lines = one_job_server.log_text().splitlines()
    assert any("job aborted after cancel" in line and running_id in line for line in log_lines)
    assert not any("job succeeded" in line and running_id in line for line in log_lines)

    # Cancelling again changes nothing; each job has one CANCELLED event.
    again = await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=queued_id))
    assert again.state == jobs_pb2.JOB_STATE_CANCELLED
    await asyncio.sleep(0.5)
    for job_id in (queued_id, running_id):
        assert events.count(job_id) == 1
    assert {e.state for e in events.events} == {jobs_pb2.JOB_STATE_CANCELLED}


async def test_a_finished_job_cannot_be_cancelled(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    job_id = (await stub.SubmitJob(job_request("quick"))).job_id
    await wait_for_states(stub, [job_id])
    cancelled = await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id))
    assert cancelled.state == jobs_pb2.JOB_STATE_SUCCEEDED
    result = await stub.GetResult(jobs_pb2.GetResultRequest(job_id=job_id))
    assert result.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert len(result.result.token_ids) == 8


async def test_queued_jobs_start_urgent_then_standard_then_bulk(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    blocker = (await stub.SubmitJob(job_request("blocker", max_tokens=1000))).job_id
    await wait_for_states(stub, [blocker], frozenset({jobs_pb2.JOB_STATE_RUNNING}))
    tiers = (jobs_pb2.JOB_TIER_BULK, jobs_pb2.JOB_TIER_STANDARD, jobs_pb2.JOB_TIER_URGENT)
    ids = [(await stub.SubmitJob(job_request(f"tier {t}", tier=t))).job_id for t in tiers]
    results = await wait_for_states(stub, [blocker, *ids])
    assert {r.state for r in results.values()} == {jobs_pb2.JOB_STATE_SUCCEEDED}
    bulk, standard, urgent = (results[i].started_at.ToNanoseconds() for i in ids)
    assert urgent < standard < bulk


async def test_a_job_whose_deadline_passes_in_the_queue_expires(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    blocker = await start_long_job(stub)
    request = job_request("too late")
    deadline_ns = time.time_ns() + 300_000_000
    request.deadline.FromNanoseconds(deadline_ns)
    job_id = (await stub.SubmitJob(request)).job_id
    while time.time_ns() <= deadline_ns:
        await asyncio.sleep(0.05)
    await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=blocker))

    result = (await wait_for_states(stub, [job_id]))[job_id]
    assert result.state == jobs_pb2.JOB_STATE_EXPIRED
    assert "deadline" in result.error
    assert not result.HasField("result")
