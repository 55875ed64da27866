"""`twolane.client` against a real server: every call blocking and asyncio, typed errors,
request ids and trace context, retries that never duplicate a job or a stream, batches,
and a retry budget that holds when the server is down."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider

from twolane.client import (
    AsyncClient,
    BatchProgress,
    Client,
    ClientConfig,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Unavailable,
)
from twolane.client.events import JobEvents
from twolane.v1 import generate_pb2, job_record_pb2, jobs_pb2

from .grpc_proxy import GrpcProxy
from .nats_fixtures import free_port
from .serving import ServerProcess

QUICK_RETRIES = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
NO_RETRIES = RetryPolicy(max_attempts=1)
SHORT: dict[str, Any] = {"max_tokens": 6, "ignore_eos": True}


def config_for(server: ServerProcess, address: str | None = None, **changes: Any) -> ClientConfig:
    """The server (or a proxy in front of it at `address`), with its NATS for wait()."""
    return ClientConfig(
        targets=(address or server.address,), data_dir=str(server.data_dir), **changes
    )


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[GrpcProxy]:
    proxy = GrpcProxy(server.address).start()
    yield proxy
    proxy.stop()


async def count_jobs(server: ServerProcess, custom_id: str) -> int:
    """Job records on the server's JetStream with this custom id."""
    assert server.data_dir is not None
    nc = await nats.connect((server.data_dir / "nats.url").read_text().strip())
    try:
        bucket = await nc.jetstream().key_value("twolane_jobs")
        found = 0
        for key in await bucket.keys():
            entry = await bucket.get(key)
            record = job_record_pb2.JobRecord.FromString(entry.value or b"")
            found += record.submission.custom_id == custom_id
        return found
    finally:
        await nc.close()


# ---- every call --------------------------------------------------------------------


def test_the_blocking_client_generates_and_streams(server: ServerProcess) -> None:
    with Client(config_for(server)) as client:
        whole = client.generate("Once upon a time", **SHORT)
        assert len(whole.token_ids) == 6
        assert whole.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        with client.stream("Once upon a time", **SHORT) as stream:
            deltas = list(stream)
        assert stream.finished and "".join(deltas) == whole.text == stream.response.text
        assert list(stream.response.token_ids) == list(whole.token_ids)
        assert stream.response.usage.completion_tokens == 6
        assert stream.response.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        from_ids = client.generate(list(whole.token_ids[:3]), max_tokens=2)
        assert from_ids.usage.prompt_tokens == 3
        assert client.get_stats().num_total_blocks > 0


async def test_the_asyncio_client_generates_and_streams(server: ServerProcess) -> None:
    async with AsyncClient(config_for(server)) as client:
        whole = await client.generate("Once upon a time", **SHORT)
        assert len(whole.token_ids) == 6
        stream = client.stream("Once upon a time", **SHORT)
        deltas = [delta async for delta in stream]
        assert stream.finished and "".join(deltas) == whole.text
        assert list(stream.response.token_ids) == list(whole.token_ids)
        assert (await client.get_stats()).num_total_blocks > 0


def test_the_blocking_client_submits_waits_and_reads_jobs(server: ServerProcess) -> None:
    with Client(config_for(server)) as client:
        submitted = client.submit("a job", tier="urgent", custom_id="mine", **SHORT)
        assert submitted.state == jobs_pb2.JOB_STATE_QUEUED and not submitted.deduplicated
        done = client.wait(submitted.job_id, 120)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and done.custom_id == "mine"
        assert len(done.result.token_ids) == 6
        read = client.result(submitted.job_id)
        assert list(read.result.token_ids) == list(done.result.token_ids)
        # A finished job keeps its state when cancelled.
        assert client.cancel(submitted.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED
        key = uuid.uuid4().hex
        first = client.submit("keyed", idempotency_key=key, **SHORT)
        again = client.submit("keyed", idempotency_key=key, **SHORT)
        assert again.job_id == first.job_id and again.deduplicated
        finished = client.submit_and_wait("and wait", timeout_s=120, **SHORT)
        assert finished.state == jobs_pb2.JOB_STATE_SUCCEEDED


async def test_the_asyncio_client_submits_waits_and_reads_jobs(server: ServerProcess) -> None:
    async with AsyncClient(config_for(server)) as client:
        submitted = await client.submit("an async job", custom_id="async", **SHORT)
        done = await client.wait(submitted.job_id, 120)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and done.custom_id == "async"
        assert (await client.result(submitted.job_id)).state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert (await client.cancel(submitted.job_id)).state == jobs_pb2.JOB_STATE_SUCCEEDED
        finished = await client.submit_and_wait("and wait", timeout_s=120, **SHORT)
        assert len(finished.result.token_ids) == 6
        prompts = [f"async batch {i}" for i in range(12)]
        items = [item async for item in client.batch(prompts, concurrency=4, **SHORT)]
        assert sorted(item.index for item in items) == list(range(12))
        assert all(item.ok and item.input == prompts[item.index] for item in items)


async def test_wait_on_events_false_polls_even_where_nats_is_reachable(
    server: ServerProcess,
) -> None:
    listening = JobEvents(config_for(server))
    polling = JobEvents(config_for(server, wait_on_events=False))
    try:
        subscription = await listening.subscribe("some-job")
        assert subscription is not None
        await subscription.close()
        assert await polling.subscribe("some-job") is None
    finally:
        await listening.close()
        await polling.close()


# ---- errors ------------------------------------------------------------------------


async def test_failures_raise_typed_errors_with_what_the_server_said(
    server: ServerProcess,
) -> None:
    async with AsyncClient(config_for(server, retry=NO_RETRIES)) as client:
        with pytest.raises(InvalidArgument) as invalid:
            await client.generate("x", top_p=2.0)
        assert [v.field for v in invalid.value.field_violations] == ["params.top_p"]
        assert invalid.value.request_id
        with pytest.raises(InvalidArgument):
            async for _ in client.stream("x", top_p=2.0):
                pass
        with pytest.raises(InvalidArgument) as invalid_job:
            await client.submit("x", max_tokens=0)
        assert [v.field for v in invalid_job.value.field_violations] == [
            "request.params.max_tokens"
        ]
        with pytest.raises(NotFound):
            await client.result("0" * 32)
        with pytest.raises(NotFound):
            await client.wait("0" * 32, 10)
        with pytest.raises(DeadlineExceeded):
            await client.generate("x", max_tokens=200, ignore_eos=True, timeout_s=0.001)
    nowhere = ClientConfig(targets=(f"127.0.0.1:{free_port()}",), retry=QUICK_RETRIES)
    async with AsyncClient(nowhere) as client:
        with pytest.raises(Unavailable):
            await client.generate("x")
        assert client.stats.num_attempts == QUICK_RETRIES.max_attempts


def test_every_call_sends_its_request_id_and_the_callers_trace(
    server: ServerProcess, proxy: GrpcProxy
) -> None:
    tracer = TracerProvider().get_tracer("caller")
    with Client(config_for(server, proxy.address)) as client:
        with tracer.start_as_current_span("caller") as span:
            named = client.generate("hi", request_id="caller-id-1", **SHORT)
            trace_id = format(span.get_span_context().trace_id, "032x")
        unnamed = client.generate("hi", **SHORT)
    first, second = proxy.calls("Generate")
    assert first.metadata["x-request-id"] == named.request_id == "caller-id-1"
    assert trace_id in first.metadata["traceparent"]
    assert second.metadata["x-request-id"] == unnamed.request_id != named.request_id
    assert "traceparent" not in second.metadata


# ---- retries -----------------------------------------------------------------------


def test_a_submit_retried_after_its_answer_was_lost_creates_exactly_one_job(
    server: ServerProcess, proxy: GrpcProxy
) -> None:
    proxy.faults.after_forwarding["SubmitJob"] = 1
    custom_id = f"once-{uuid.uuid4().hex}"
    with Client(config_for(server, proxy.address, retry=QUICK_RETRIES)) as client:
        submitted = client.submit("exactly once", custom_id=custom_id, **SHORT)
        assert client.wait(submitted.job_id, 120).state == jobs_pb2.JOB_STATE_SUCCEEDED
    attempts = proxy.calls("SubmitJob")
    assert len(attempts) == 2
    sent = [jobs_pb2.SubmitJobRequest.FromString(a.request) for a in attempts]
    assert sent[0].idempotency_key and sent[0].idempotency_key == sent[1].idempotency_key
    assert attempts[0].metadata["x-request-id"] == attempts[1].metadata["x-request-id"]
    # The first attempt did queue the job; the retry got that job back.
    assert attempts[0].response is not None
    lost = jobs_pb2.SubmitJobResponse.FromString(attempts[0].response)
    assert submitted.job_id == lost.job_id and submitted.deduplicated
    assert asyncio.run(count_jobs(server, custom_id)) == 1


async def test_a_stream_is_retried_before_its_first_message_and_never_after(
    server: ServerProcess, proxy: GrpcProxy
) -> None:
    async with AsyncClient(config_for(server, proxy.address, retry=QUICK_RETRIES)) as client:
        proxy.faults.before_forwarding["GenerateStream"] = 1
        stream = client.stream("retried", **SHORT)
        assert "".join([delta async for delta in stream]) == stream.response.text
        assert len(stream.response.token_ids) == 6
        assert len(proxy.calls("GenerateStream")) == 2

        proxy.faults.streams_cut_after_first_message = 1
        broken = client.stream("cut", max_tokens=32, ignore_eos=True)
        with pytest.raises(Unavailable):
            async for _ in broken:
                pass
        assert len(proxy.calls("GenerateStream")) == 3
        assert len(broken.response.token_ids) < 32


# ---- batch -------------------------------------------------------------------------


def test_a_batch_of_200_prompts_returns_200_results_matched_to_their_inputs(
    server: ServerProcess,
) -> None:
    prompts = [f"prompt {i}: " + "ab" * (i % 17) for i in range(200)]
    progress: list[BatchProgress] = []
    with Client(config_for(server)) as client:
        items = list(
            client.batch(prompts, concurrency=32, on_progress=progress.append, max_tokens=4)
        )
        direct = {i: client.generate(prompts[i], max_tokens=4) for i in (0, 57, 123, 199)}
    assert sorted(item.index for item in items) == list(range(200))
    by_index = {item.index: item for item in items}
    for index, item in by_index.items():
        assert item.ok, item.error
        assert item.result is not None
        assert item.input == prompts[index] and item.result.custom_id == str(index)
    for index, reply in direct.items():
        result = by_index[index].result
        assert result is not None
        assert list(result.result.token_ids) == list(reply.token_ids)
        assert result.result.usage.prompt_tokens == reply.usage.prompt_tokens
    assert [p.num_done for p in progress] == list(range(1, 201))
    assert progress[-1] == BatchProgress(200, 0, 200)


# ---- the retry budget --------------------------------------------------------------


async def test_fifty_clients_against_a_stopping_server_stay_within_their_retry_budget() -> None:
    stopping = GrpcProxy(upstream=None).start()  # answers UNAVAILABLE to everything
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.001, max_backoff_s=0.01)
    num_calls = 10
    clients = [
        AsyncClient(
            ClientConfig(
                targets=(stopping.address,), retry=policy, metadata=(("x-client", f"{i}"),)
            )
        )
        for i in range(50)
    ]

    async def calls(client: AsyncClient) -> None:
        for _ in range(num_calls):
            with pytest.raises(Unavailable):
                await client.generate("hi", max_tokens=1)

    try:
        await asyncio.gather(*(calls(client) for client in clients))
    finally:
        for client in clients:
            await client.close()
        stopping.stop()
    per_client = Counter(seen.metadata["x-client"] for seen in stopping.calls("Generate"))
    assert len(per_client) == 50
    # Without a budget: 10 calls x 5 attempts = 50 each. With it: every call's first
    # attempt, and retries only until half of the 10 tokens are gone.
    budget_retries = int(policy.budget_max_tokens / 2)
    assert set(per_client.values()) <= set(range(num_calls, num_calls + budget_retries + 1))
    assert all(c.stats.num_retries_throttled >= num_calls - 2 for c in clients)


async def test_clients_of_a_stopped_server_give_up_within_their_retry_budget(
    server: ServerProcess, proxy: GrpcProxy
) -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.001, max_backoff_s=0.01)
    clients = [AsyncClient(config_for(server, proxy.address, retry=policy)) for _ in range(50)]
    try:
        await asyncio.gather(*(client.generate("up", max_tokens=1) for client in clients))
        proxy.stop()  # nothing listens on the port any more
        for _ in range(10):
            for outcome in await asyncio.gather(
                *(client.generate("down", max_tokens=1) for client in clients),
                return_exceptions=True,
            ):
                assert isinstance(outcome, Unavailable), outcome
    finally:
        for client in clients:
            await client.close()
    for client in clients:
        assert client.stats.num_attempts <= 1 + 10 + policy.budget_max_tokens / 2
