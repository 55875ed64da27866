"""The batch lane on `twolane serve` against a real nats-server: jobs, events, dead letters."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import grpc
import nats
import pytest

from twolane.models.builtin import builtin_model_dir
from twolane.models.tokenizer import Tokenizer
from twolane.services import jetstream
from twolane.services.jetstream import DEFAULT_TENANT
from twolane.services.job_store import queued_record
from twolane.v1 import inference_pb2_grpc, job_record_pb2, jobs_pb2

from .nats_fixtures import EventRecorder, NatsServer, job_request, wait_for_states
from .serving import ServerProcess, start_server

FAIL_PREFIX = "always-fail:"
MAX_DELIVER = 3
TIERS = (jobs_pb2.JOB_TIER_URGENT, jobs_pb2.JOB_TIER_STANDARD, jobs_pb2.JOB_TIER_BULK)


@pytest.fixture(scope="module")
def jobs_server(nats_server: NatsServer) -> Iterator[ServerProcess]:
    env = {
        "TWOLANE_FAULT_FAIL_PROMPT_PREFIX": FAIL_PREFIX,
        "TWOLANE_JOB_MAX_DELIVER": str(MAX_DELIVER),
        "TWOLANE_JOB_RETRY_BACKOFF_S": "0.1",
    }
    server = start_server("--nats-url", nats_server.url, env=env)
    yield server
    server.stop()


@pytest.fixture
async def stub(
    jobs_server: ServerProcess,
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(jobs_server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def read_records(url: str, job_ids: set[str]) -> dict[str, job_record_pb2.JobRecord]:
    nc = await nats.connect(url)
    try:
        bucket = await nc.jetstream().key_value("twolane_jobs")
        return {
            job_id: job_record_pb2.JobRecord.FromString((await bucket.get(job_id)).value or b"")
            for job_id in job_ids
        }
    finally:
        await nc.close()


async def wait_for_events(events: EventRecorder, job_ids: set[str], timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if all(events.count(job_id) for job_id in job_ids):
            break
        await asyncio.sleep(0.05)
    # A second event, if any were coming, would come right behind the first.
    await asyncio.sleep(0.5)


@pytest.mark.slow
async def test_hundred_jobs_of_mixed_tiers_succeed_once_with_transformers_tokens(
    stub: inference_pb2_grpc.InferenceServiceStub,
    events: EventRecorder,
    nats_server: NatsServer,
) -> None:
    # 40 submissions share 20 idempotency keys; 60 have none: 80 jobs in all.
    submissions = []
    for i in range(100):
        key = f"shared-{i % 20}" if i < 40 else ""
        submissions.append(
            job_request(f"job {key or i}:", max_tokens=6, tier=TIERS[i % 3], idempotency_key=key)
        )
    responses = await asyncio.gather(*(stub.SubmitJob(s) for s in submissions))

    ids_by_key: dict[str, set[str]] = {}
    for submission, response in zip(submissions, responses, strict=True):
        ids_by_key.setdefault(submission.idempotency_key or response.job_id, set()).add(
            response.job_id
        )
    assert all(len(ids) == 1 for ids in ids_by_key.values())
    job_ids = {response.job_id for response in responses}
    assert len(job_ids) == 80
    assert sum(response.deduplicated for response in responses) == 20

    results = await wait_for_states(stub, job_ids)
    assert {r.state for r in results.values()} == {jobs_pb2.JOB_STATE_SUCCEEDED}

    from checkpoints import hf_greedy

    prompt_by_id = {
        response.job_id: submission.request.prompt
        for submission, response in zip(submissions, responses, strict=True)
    }
    ordered = sorted(job_ids)
    tokenizer = Tokenizer.from_dir(builtin_model_dir())
    expected = hf_greedy(
        builtin_model_dir(), [tokenizer.encode(prompt_by_id[j]) for j in ordered], 6
    )
    assert [list(results[j].result.token_ids) for j in ordered] == expected

    records = await read_records(nats_server.url, job_ids)
    assert {record.attempts for record in records.values()} == {1}

    await wait_for_events(events, job_ids)
    assert {job_id: events.count(job_id) for job_id in job_ids} == dict.fromkeys(job_ids, 1)
    assert all(e.state == jobs_pb2.JOB_STATE_SUCCEEDED for e in events.events)
    assert {e.job_id: list(e.result.token_ids) for e in events.events} == {
        j: list(results[j].result.token_ids) for j in job_ids
    }


async def test_a_job_that_always_fails_is_dead_lettered_after_max_deliveries(
    stub: inference_pb2_grpc.InferenceServiceStub,
    events: EventRecorder,
    nats_server: NatsServer,
) -> None:
    submitted = await stub.SubmitJob(
        job_request(FAIL_PREFIX + " doomed", tier=jobs_pb2.JOB_TIER_BULK, custom_id="doomed-1")
    )
    job_id = submitted.job_id

    result = (await wait_for_states(stub, [job_id]))[job_id]
    assert result.state == jobs_pb2.JOB_STATE_FAILED
    assert f"failed on all {MAX_DELIVER} deliveries" in result.error
    assert "fault injected" in result.error
    assert not result.HasField("result")

    nc = await nats.connect(nats_server.url)
    try:
        msg = await nc.jetstream().get_last_msg("TWOLANE_DLQ", "twolane.dlq.bulk")
    finally:
        await nc.close()
    letter = job_record_pb2.DeadLetter.FromString(msg.data)
    assert (letter.job_id, letter.num_deliveries) == (job_id, MAX_DELIVER)
    assert letter.reason == result.error

    records = await read_records(nats_server.url, {job_id})
    assert records[job_id].attempts == MAX_DELIVER
    await wait_for_events(events, {job_id})
    assert events.count(job_id) == 1
    assert events.events[-1].state == jobs_pb2.JOB_STATE_FAILED
    assert events.events[-1].custom_id == "doomed-1"


async def test_an_unknown_job_id_is_not_found(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    for job_id in ("0" * 32, "not-a-job-id"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetResult(jobs_pb2.GetResultRequest(job_id=job_id))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id))
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_bad_job_request_is_refused_by_field(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    request = job_request("hello", max_tokens=0)
    request.deadline.FromSeconds(1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitJob(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "request.params.max_tokens" in (info.value.details() or "")
    assert "deadline" in (info.value.details() or "")


async def test_results_carry_custom_id_and_timestamps(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    submitted = await stub.SubmitJob(job_request("stamp", custom_id="row-7"))
    result = (await wait_for_states(stub, [submitted.job_id]))[submitted.job_id]
    assert result.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert result.custom_id == "row-7"
    assert len(result.result.token_ids) == 8
    created, started, finished = (
        result.created_at.ToNanoseconds(),
        result.started_at.ToNanoseconds(),
        result.finished_at.ToNanoseconds(),
    )
    assert 0 < created <= started <= finished


async def test_a_retry_after_a_submitter_died_before_queueing_its_ticket_runs_the_job(
    stub: inference_pb2_grpc.InferenceServiceStub, nats_server: NatsServer
) -> None:
    """A frontend (or gateway) killed inside SubmitJob, after the idempotency key and the
    record were written but before the ticket was queued: the client's retry with the
    same key must queue the job, not just return its id."""
    request = job_request("orphaned before its ticket:", max_tokens=4, idempotency_key="k-died")
    job_id = secrets.token_hex(16)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        key = jetstream.idempotency_key_hash(DEFAULT_TENANT, request.idempotency_key)
        await (await js.key_value(jetstream.IDEMPOTENCY_BUCKET)).create(key, job_id.encode())
        record = queued_record(job_id, DEFAULT_TENANT, request)
        await (await js.key_value(jetstream.JOBS_BUCKET)).create(job_id, record.SerializeToString())
    finally:
        await nc.close()
    retried = await stub.SubmitJob(request)
    assert (retried.job_id, retried.deduplicated) == (job_id, True)
    results = await wait_for_states(stub, [job_id], timeout_s=60)
    assert results[job_id].state == jobs_pb2.JOB_STATE_SUCCEEDED
