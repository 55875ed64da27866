"""A job whose last allowed delivery dies with its worker is dead-lettered, not left RUNNING."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import nats
import pytest

from twolane.v1 import inference_pb2_grpc, job_record_pb2, jobs_pb2

from .nats_fixtures import NatsServer, job_request, start_process, wait_for_states
from .serving import ServerProcess

ONE_DELIVERY = {"TWOLANE_JOB_MAX_DELIVER": "1", "TWOLANE_JOB_ACK_WAIT_S": "2"}


@pytest.mark.slow
async def test_a_job_whose_only_worker_dies_on_its_last_delivery_is_dead_lettered(
    tmp_path: Path,
) -> None:
    nats_server = NatsServer(tmp_path / "nats").start()
    workers: list[ServerProcess] = []
    try:
        args = ("serve", "--port", "0", "--nats-url", nats_server.url)
        # Two workers, both up before one dies, so a live one hears JetStream give up.
        workers = [start_process(*args, env=ONE_DELIVERY) for _ in range(2)]
        for worker in workers:
            # Listening is the frontend's line; the job runner comes up after it.
            worker.wait_for_line("job worker started")
        async with grpc.aio.insecure_channel(workers[0].address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            job_id = (await stub.SubmitJob(job_request("never ends", max_tokens=2000))).job_id
            await wait_for_states(stub, [job_id], frozenset({jobs_pb2.JOB_STATE_RUNNING}))
        worker_id = await running_worker_id(nats_server.url, job_id)
        running = next(w for w in workers if worker_id in w.log_text())
        survivor = next(w for w in workers if w is not running)
        running.proc.send_signal(signal.SIGKILL)
        running.proc.wait()

        await assert_dead_lettered(survivor.address, nats_server.url, job_id)
    finally:
        for worker in workers:
            worker.stop()
        nats_server.stop()


async def assert_dead_lettered(address: str, nats_url: str, job_id: str) -> None:
    """The job ends FAILED for its dead worker, with a dead letter, and its message is gone
    from the work queue rather than stuck there."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        results = await wait_for_states(stub, [job_id], timeout_s=60)
    assert results[job_id].state == jobs_pb2.JOB_STATE_FAILED
    assert "died" in results[job_id].error
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        letter_msg = await js.get_last_msg("TWOLANE_DLQ", "twolane.dlq.standard")
        jobs_stream = await js.stream_info("TWOLANE_JOBS")
    finally:
        await nc.close()
    assert job_record_pb2.DeadLetter.FromString(letter_msg.data).job_id == job_id
    assert jobs_stream.state.messages == 0


async def running_worker_id(url: str, job_id: str) -> str:
    nc = await nats.connect(url)
    try:
        entry = await (await nc.jetstream().key_value("twolane_jobs")).get(job_id)
    finally:
        await nc.close()
    return job_record_pb2.JobRecord.FromString(entry.value or b"").worker_id


@pytest.mark.slow
async def test_a_job_whose_worker_died_on_its_last_delivery_fails_on_a_worker_started_later(
    tmp_path: Path,
) -> None:
    """No worker listens when the last delivery runs out: the next one to start still
    dead-letters the job instead of leaving it RUNNING with its message stuck."""
    nats_server = NatsServer(tmp_path / "nats").start()
    workers: list[ServerProcess] = []
    try:
        args = ("worker", "--port", "0", "--nats-url", nats_server.url)
        first = start_process(*args, env={**ONE_DELIVERY, "TWOLANE_DATA_DIR": str(tmp_path / "a")})
        workers.append(first)
        first.wait_for_line("job worker started")
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            job_id = (await stub.SubmitJob(job_request("never ends", max_tokens=2000))).job_id
            await wait_for_states(stub, [job_id], frozenset({jobs_pb2.JOB_STATE_RUNNING}))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        # Past the ack wait with nobody listening: JetStream has given up on the message.
        await asyncio.sleep(2 * float(ONE_DELIVERY["TWOLANE_JOB_ACK_WAIT_S"]))

        later = start_process(*args, env={**ONE_DELIVERY, "TWOLANE_DATA_DIR": str(tmp_path / "b")})
        workers.append(later)
        await assert_dead_lettered(later.address, nats_server.url, job_id)
    finally:
        for worker in workers:
            worker.stop()
        nats_server.stop()
