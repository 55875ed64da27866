"""`twolane gateway` and `twolane worker` as separate processes on one nats-server."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import nats
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc, job_record_pb2, jobs_pb2

from .nats_fixtures import (
    EventRecorder,
    NatsServer,
    free_port,
    job_request,
    start_process,
    stream_last_seq,
    wait_for_states,
)
from .serving import ServerProcess

ACK_WAIT_S = "2"
QUEUED = frozenset({jobs_pb2.JOB_STATE_QUEUED})
RUNNING = frozenset({jobs_pb2.JOB_STATE_RUNNING})
SUCCEEDED = {jobs_pb2.JOB_STATE_SUCCEEDED}


class Workers:
    """The one worker process of the module, on a fixed port the gateway knows."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.port = free_port()
        self.current: ServerProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.current = start_process(
            "worker",
            "--port",
            str(self.port),
            "--nats-url",
            self.nats_url,
            env={"TWOLANE_JOB_ACK_WAIT_S": ACK_WAIT_S},
        )
        return self.current

    def ensure_started(self) -> ServerProcess:
        if self.current is None or self.current.proc.poll() is not None:
            return self.start()
        return self.current

    def kill(self) -> None:
        assert self.current is not None
        self.current.proc.send_signal(signal.SIGKILL)
        self.current.proc.wait()

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture(scope="module")
def workers(nats_server: NatsServer) -> Iterator[Workers]:
    workers = Workers(nats_server.url)
    yield workers
    workers.stop()


@pytest.fixture(scope="module")
def gateway(nats_server: NatsServer, workers: Workers) -> Iterator[ServerProcess]:
    env = {"TWOLANE_JOB_ACK_WAIT_S": ACK_WAIT_S}
    args = ("--nats-url", nats_server.url, "--worker", workers.address)
    server = start_process("gateway", "--port", "0", *args, env=env)
    yield server
    server.stop()


@pytest.fixture
async def stub(gateway: ServerProcess) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def read_attempts(url: str, job_ids: list[str]) -> list[int]:
    nc = await nats.connect(url)
    try:
        bucket = await nc.jetstream().key_value("twolane_jobs")
        return [
            job_record_pb2.JobRecord.FromString((await bucket.get(j)).value or b"").attempts
            for j in job_ids
        ]
    finally:
        await nc.close()


@pytest.mark.slow
async def test_queued_jobs_survive_a_nats_server_restart(
    stub: inference_pb2_grpc.InferenceServiceStub,
    nats_server: NatsServer,
    workers: Workers,
) -> None:
    assert workers.current is None  # nothing takes the jobs off the queue yet
    job_ids = [(await stub.SubmitJob(job_request(f"durable {i}"))).job_id for i in range(10)]
    await wait_for_states(stub, job_ids, QUEUED)

    nats_server.restart()
    workers.start()

    results = await wait_for_states(stub, job_ids)
    assert {r.state for r in results.values()} == SUCCEEDED
    assert all(len(r.result.token_ids) == 8 for r in results.values())


async def test_the_gateway_forwards_generation_to_a_worker(
    stub: inference_pb2_grpc.InferenceServiceStub, workers: Workers
) -> None:
    workers.ensure_started()
    request = generate_pb2.GenerateRequest(
        prompt="forwarded", params=generate_pb2.SamplingParams(max_tokens=6)
    )
    async with grpc.aio.insecure_channel(workers.address) as channel:
        direct = await inference_pb2_grpc.InferenceServiceStub(channel).Generate(request)
    via_gateway = await stub.Generate(request)
    assert list(via_gateway.token_ids) == list(direct.token_ids)
    assert len(via_gateway.token_ids) == 6
    streamed = [
        t
        async for chunk in stub.GenerateStream(
            generate_pb2.GenerateStreamRequest(prompt="forwarded", params=request.params)
        )
        for t in chunk.token_ids
    ]
    assert streamed == list(direct.token_ids)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_pb2.GenerateRequest(prompt="x", prompt_token_ids=[1]))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "prompt_token_ids"


async def test_the_gateway_skips_a_worker_it_cannot_reach_and_sums_stats(
    nats_server: NatsServer, workers: Workers
) -> None:
    workers.ensure_started()
    async with grpc.aio.insecure_channel(workers.address) as channel:
        direct = await inference_pb2_grpc.InferenceServiceStub(channel).GetStats(
            inference_pb2.GetStatsRequest()
        )
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    nats_args = ("--nats-url", nats_server.url)
    # The live worker twice: its stats must count twice, the dead one's not at all.
    worker_args = ("--worker", dead, "--worker", workers.address, "--worker", workers.address)
    gateway = start_process("gateway", "--port", "0", *nats_args, *worker_args)
    params = generate_pb2.SamplingParams(max_tokens=4, ignore_eos=True)
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # Four rounds of two calls over three workers: the dead one is first in turn
            # for a Generate and for a GenerateStream.
            for i in range(4):
                request = generate_pb2.GenerateRequest(prompt=f"p{i}", params=params)
                response = await stub.Generate(request)
                assert len(response.token_ids) == 4
                stream = stub.GenerateStream(
                    generate_pb2.GenerateStreamRequest(prompt=f"p{i}", params=params)
                )
                streamed = [t async for chunk in stream for t in chunk.token_ids]
                assert streamed == list(response.token_ids)
            stats = await stub.GetStats(inference_pb2.GetStatsRequest())
            assert stats.num_total_blocks == 2 * direct.num_total_blocks > 0
            assert stats.num_free_blocks + stats.num_used_blocks == stats.num_total_blocks
    finally:
        gateway.stop()
    assert "worker unavailable" in gateway.log_text()

    # With no worker reachable, the client gets the worker's UNAVAILABLE.
    gateway = start_process("gateway", "--port", "0", *nats_args, "--worker", dead)
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = generate_pb2.GenerateRequest(prompt="p", params=params)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(request)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            stream = stub.GenerateStream(
                generate_pb2.GenerateStreamRequest(prompt="p", params=params)
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [chunk async for chunk in stream]
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetStats(inference_pb2.GetStatsRequest())
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        gateway.stop()


async def test_a_job_the_model_cannot_run_fails_at_once_without_retries(
    stub: inference_pb2_grpc.InferenceServiceStub, workers: Workers, nats_server: NatsServer
) -> None:
    workers.ensure_started()
    # The gateway has no model, so only a worker can see the token is outside the vocabulary.
    request = jobs_pb2.SubmitJobRequest(
        request=generate_pb2.GenerateRequest(prompt_token_ids=[1, 100_000])
    )
    job_id = (await stub.SubmitJob(request)).job_id
    result = (await wait_for_states(stub, [job_id]))[job_id]
    assert result.state == jobs_pb2.JOB_STATE_FAILED
    assert "invalid request" in result.error
    assert "prompt_token_ids" in result.error
    assert await read_attempts(nats_server.url, [job_id]) == [1]


@pytest.mark.slow
async def test_a_worker_killed_mid_job_loses_nothing_and_doubles_nothing(
    stub: inference_pb2_grpc.InferenceServiceStub,
    workers: Workers,
    nats_server: NatsServer,
    events: EventRecorder,
) -> None:
    workers.ensure_started()
    results_seq_before = await stream_last_seq(nats_server.url, "KV_twolane_results")
    job_ids = [
        (await stub.SubmitJob(job_request(f"killed {i}", max_tokens=400))).job_id for i in range(12)
    ]
    await wait_for_states(stub, job_ids[:1], RUNNING)
    workers.kill()
    workers.start()

    results = await wait_for_states(stub, job_ids)
    assert {r.state for r in results.values()} == SUCCEEDED
    assert all(len(r.result.token_ids) == 400 for r in results.values())
    # One result written per job, whatever ran twice.
    results_seq_after = await stream_last_seq(nats_server.url, "KV_twolane_results")
    assert results_seq_after - results_seq_before == len(job_ids)
    attempts = await read_attempts(nats_server.url, job_ids)
    assert max(attempts) >= 2  # the killed worker's jobs really ran again
    for _ in range(100):
        if all(events.count(j) for j in job_ids):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert [events.count(j) for j in job_ids] == [1] * len(job_ids)


async def test_a_full_queue_refuses_new_jobs_and_keeps_the_old(tmp_path: Path) -> None:
    small = NatsServer(tmp_path / "nats").start()
    args = ("--nats-url", small.url, "--job-max-queued-jobs", "5")
    gateway = start_process("gateway", "--port", "0", *args)
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            accepted = [
                await stub.SubmitJob(job_request(f"q {i}", idempotency_key=f"k{i}"))
                for i in range(5)
            ]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SubmitJob(job_request("one too many", idempotency_key="k-extra"))
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            # A repeated key needs no room: it is the job already queued.
            again = await stub.SubmitJob(job_request("q 0", idempotency_key="k0"))
            assert (again.job_id, again.deduplicated) == (accepted[0].job_id, True)
            await wait_for_states(stub, [a.job_id for a in accepted], QUEUED, timeout_s=5)
    finally:
        gateway.stop()
        small.stop()
