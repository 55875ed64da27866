"""Scale-out on loopback: workers found through NATS, cache-aware routing, failover.

Two `twolane worker`s and one `twolane gateway` (no --worker flag) on one nats-server,
with a short heartbeat and TTL; a test that needs a third worker starts its own.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import nats.js.errors
import pytest

from twolane.services.membership import WORKERS_BUCKET, decode_record, worker_key
from twolane.services.model_files import MODELS_BUCKET
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

TTL_S = 3.0
ENV = {
    "TWOLANE_HEARTBEAT_INTERVAL_S": "0.5",
    "TWOLANE_WORKER_TTL_S": str(TTL_S),
    "TWOLANE_JOB_ACK_WAIT_S": "2",
    # Few jobs at a time per worker, so that a burst of jobs lands on both.
    "TWOLANE_JOB_MAX_BATCH_INFLIGHT": "4",
}
BLOCK_SIZE = 16
WAIT_S = 60.0
SUCCEEDED = {jobs_pb2.JOB_STATE_SUCCEEDED}
FLEET_DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "twolane-fleet.json"


@dataclass
class Fleet:
    nats_url: str
    workers: list[ServerProcess]
    gateway: ServerProcess
    metrics_port: int

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read().decode()

    def gauge(self, name: str, label: str) -> float:
        pattern = re.compile(rf"^{name}\{{{re.escape(label)}\}} ([0-9.e+]+)$", re.MULTILINE)
        match = pattern.search(self.metrics())
        return float(match.group(1)) if match else 0.0

    def serving(self) -> int:
        return int(self.gauge("twolane_gateway_workers", 'state="serving"'))

    def index_blocks(self, worker: ServerProcess) -> int:
        label = f'worker="{worker.address}"'
        return int(self.gauge("twolane_gateway_cache_index_blocks", label))

    def gateway_lines_since(self, mark: int) -> list[str]:
        return self.gateway.lines[mark:]


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    give_up_s = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up_s:
            pytest.fail(f"never: {what}")
        await asyncio.sleep(0.1)


def start_workers(nats_url: str, count: int, *args: str) -> list[ServerProcess]:
    workers = [
        start_process("worker", "--port", "0", "--nats-url", nats_url, *args, env=ENV, wait=False)
        for _ in range(count)
    ]
    for worker in workers:
        worker.wait_listening()
        # Listening is the frontend's line; the job runner comes up after it, and a burst
        # of jobs would all go to the worker whose runner is up first.
        worker.wait_for_line("job worker started")
    return workers


@pytest.fixture(scope="module")
def fleet(nats_server: NatsServer) -> Iterator[Fleet]:
    workers = start_workers(nats_server.url, 2)
    metrics_port = free_port()
    gateway = start_process(
        "gateway",
        "--port",
        "0",
        "--nats-url",
        nats_server.url,
        "--metrics-port",
        str(metrics_port),
        env=ENV,
    )
    running = Fleet(nats_server.url, workers, gateway, metrics_port)
    give_up_s = time.monotonic() + WAIT_S
    while running.serving() < 2 or "tokenizer ready" not in gateway.log_text():
        if time.monotonic() > give_up_s:
            pytest.fail(f"the gateway did not find both workers:\n{gateway.log_text()}")
        time.sleep(0.1)
    yield running
    gateway.stop()
    for worker in workers:
        worker.stop()


@pytest.fixture
async def gateway_stub(fleet: Fleet) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(fleet.gateway.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def generate(
    address: str, prompt: str = "", max_tokens: int = 2, token_ids: list[int] | None = None
) -> generate_pb2.GenerateResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        request = generate_pb2.GenerateRequest(
            prompt=prompt,
            prompt_token_ids=token_ids or [],
            params=generate_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        return await inference_pb2_grpc.InferenceServiceStub(channel).Generate(request)


async def job_records(url: str, job_ids: list[str]) -> list[job_record_pb2.JobRecord]:
    nc = await nats.connect(url)
    try:
        bucket = await nc.jetstream().key_value("twolane_jobs")
        return [
            job_record_pb2.JobRecord.FromString((await bucket.get(j)).value or b"") for j in job_ids
        ]
    finally:
        await nc.close()


async def test_workers_announce_address_model_and_load_in_the_bucket(fleet: Fleet) -> None:
    nc = await nats.connect(fleet.nats_url)
    try:
        js = nc.jetstream()
        bucket = await js.key_value(WORKERS_BUCKET)
        for worker in fleet.workers:
            record = decode_record((await bucket.get(worker_key(worker.address))).value or b"")
            assert record.address == worker.address
            assert record.state == "serving"
            assert (record.model, record.block_size, record.max_num_seqs) == ("builtin", 16, 64)
            assert record.num_total_blocks > 0
            assert record.ttl_s == TTL_S
            store = await js.object_store(MODELS_BUCKET)
            info = await store.get_info(f"tokenizer/{record.tokenizer}/tokenizer.json")
            assert info.size > 0
    finally:
        await nc.close()


async def test_the_gateway_sums_the_stats_of_the_workers_it_found(
    fleet: Fleet, gateway_stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    totals = []
    for worker in fleet.workers:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            totals.append((await stub.GetStats(inference_pb2.GetStatsRequest())).num_total_blocks)
    stats = await gateway_stub.GetStats(inference_pb2.GetStatsRequest())
    assert stats.num_workers == 2
    assert stats.num_total_blocks == sum(totals)


async def test_a_text_prompt_goes_to_the_worker_holding_its_prefix(fleet: Fleet) -> None:
    warm = fleet.workers[0]
    prompt = "A conversation that one worker has seen before. " * 5  # 250 bytes
    await generate(warm.address, prompt)
    num_blocks = (len(prompt) + 1) // BLOCK_SIZE  # the byte tokenizer adds BOS
    await eventually(
        lambda: fleet.index_blocks(warm) >= num_blocks, "the gateway learns the warm cache"
    )
    replies = [await generate(fleet.gateway.address, f"{prompt} Turn {i}.") for i in range(6)]
    # Round robin would have sent half of them to the other worker, which holds none of it.
    assert [r.usage.cached_tokens for r in replies] == [num_blocks * BLOCK_SIZE] * 6


async def test_token_ids_go_to_the_worker_holding_their_prefix(fleet: Fleet) -> None:
    warm = fleet.workers[1]
    prefix = [(7 * i) % 256 for i in range(10 * BLOCK_SIZE + 1)]
    before = fleet.index_blocks(warm)
    await generate(warm.address, token_ids=prefix)
    await eventually(lambda: fleet.index_blocks(warm) >= before + 10, "the index grows")
    for i in range(4):
        reply = await generate(fleet.gateway.address, token_ids=[*prefix, i, i + 1])
        assert reply.usage.cached_tokens == 10 * BLOCK_SIZE


async def test_every_metric_the_fleet_dashboard_queries_is_in_a_gateway_scrape(
    fleet: Fleet,
) -> None:
    await generate(fleet.gateway.address, "for the dashboard")
    queried = set(re.findall(r"twolane_[a-z0-9_]+", FLEET_DASHBOARD.read_text()))
    exported = set(re.findall(r"^(twolane_[a-z0-9_]+)", fleet.metrics(), re.MULTILINE))
    assert len(queried) >= 7
    assert queried <= exported, sorted(queried - exported)


async def test_jobs_spread_over_both_workers_and_complete_once(
    fleet: Fleet,
    gateway_stub: inference_pb2_grpc.InferenceServiceStub,
    events: EventRecorder,
) -> None:
    # Long enough that one worker cannot drain the queue before the other's runner pulls
    # (on a busy machine the niced job runners get the CPU late).
    job_ids = [
        (await gateway_stub.SubmitJob(job_request(f"spread {i}", max_tokens=320))).job_id
        for i in range(16)
    ]
    results = await wait_for_states(gateway_stub, job_ids)
    assert {r.state for r in results.values()} == SUCCEEDED
    records = await job_records(fleet.nats_url, job_ids)
    assert len({r.worker_id for r in records}) == 2
    await eventually(lambda: all(events.count(j) for j in job_ids), "every event arrives")
    await asyncio.sleep(0.5)
    assert [events.count(j) for j in job_ids] == [1] * len(job_ids)


@pytest.mark.slow
async def test_a_draining_worker_finishes_its_stream_and_gets_no_new_calls(
    fleet: Fleet, gateway_stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    # Listening on every interface, announced at a loopback address, with two frontends
    # on one port: still one record, for one address.
    (third,) = start_workers(
        fleet.nats_url,
        1,
        "--host",
        "0.0.0.0",
        "--advertise-address",
        "127.0.0.1",
        "--api-server-count",
        "2",
    )
    try:
        await eventually(lambda: fleet.serving() == 3, "the gateway finds the third worker")
        nc = await nats.connect(fleet.nats_url)
        try:
            keys = await (await nc.jetstream().key_value(WORKERS_BUCKET)).keys()
        finally:
            await nc.close()
        assert sorted(keys) == sorted(worker_key(w.address) for w in [*fleet.workers, third])

        prompt = "Only the third worker knows this story, word for word. " * 4
        await generate(third.address, prompt)
        num_blocks = (len(prompt) + 1) // BLOCK_SIZE
        await eventually(lambda: fleet.index_blocks(third) >= num_blocks, "its cache is known")
        request = generate_pb2.GenerateStreamRequest(
            prompt=prompt + " Go on.",
            params=generate_pb2.SamplingParams(max_tokens=300, ignore_eos=True),
        )
        stream = gateway_stub.GenerateStream(request)
        first = await stream.read()
        assert first is not grpc.aio.EOF and first.token_ids
        num_tokens = len(first.token_ids)  # the stream runs on the third worker (its cache)
        mark = len(fleet.gateway.lines)
        third.proc.send_signal(signal.SIGTERM)
        await eventually(
            lambda: any(
                "draining" in line and third.address in line
                for line in fleet.gateway_lines_since(mark)
            ),
            "the gateway hears that the worker drains",
        )
        # New calls go elsewhere: the others hold none of the prompt.
        again = await generate(fleet.gateway.address, prompt + " Again.")
        assert again.usage.cached_tokens == 0
        while (chunk := await stream.read()) is not grpc.aio.EOF:
            num_tokens += len(chunk.token_ids)
        assert num_tokens == 300
        assert not any("worker unavailable" in line for line in fleet.gateway_lines_since(mark))
        assert third.proc.wait(30) == 0
        await eventually(
            lambda: any(
                "worker left" in line and third.address in line
                for line in fleet.gateway_lines_since(mark)
            ),
            "its record is deleted",
        )
    finally:
        third.stop()


@pytest.mark.slow
async def test_a_killed_worker_leaves_within_its_ttl_and_its_jobs_finish_elsewhere_once(
    fleet: Fleet,
    gateway_stub: inference_pb2_grpc.InferenceServiceStub,
    nats_server: NatsServer,
    events: EventRecorder,
) -> None:
    victim, survivor = fleet.workers
    results_before = await stream_last_seq(nats_server.url, "KV_twolane_results")
    job_ids = [
        (await gateway_stub.SubmitJob(job_request(f"long {i}", max_tokens=400))).job_id
        for i in range(12)
    ]
    give_up_s = time.monotonic() + WAIT_S
    while True:  # until both workers run some of them
        running = {
            job_id: r.worker_id
            for job_id, r in zip(job_ids, await job_records(nats_server.url, job_ids), strict=True)
            if r.state == jobs_pb2.JOB_STATE_RUNNING
        }
        if len(set(running.values())) == 2:
            break
        assert time.monotonic() < give_up_s, "the jobs never ran on both workers"
        await asyncio.sleep(0.1)

    mark = len(fleet.gateway.lines)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    # Interactive calls keep working at once: the dead worker is skipped.
    for i in range(4):
        assert (
            len((await generate(fleet.gateway.address, f"after {i}", max_tokens=4)).token_ids) == 4
        )
    await eventually(
        lambda: any(
            "worker left" in line and victim.address in line
            for line in fleet.gateway_lines_since(mark)
        ),
        "the gateway drops the dead worker",
        timeout_s=TTL_S + 5,
    )
    after_drop = len(fleet.gateway.lines)
    for i in range(4):
        await generate(fleet.gateway.address, f"later {i}", max_tokens=4)
    assert not any("worker unavailable" in line for line in fleet.gateway_lines_since(after_drop))

    nc = await nats.connect(nats_server.url)
    try:
        bucket = await nc.jetstream().key_value(WORKERS_BUCKET)
        give_up_s = time.monotonic() + TTL_S + 5
        while True:  # the bucket forgets it too
            try:
                await bucket.get(worker_key(victim.address))
            except nats.js.errors.KeyNotFoundError:
                break
            assert time.monotonic() < give_up_s, "the dead worker's record stays"
            await asyncio.sleep(0.2)
        await bucket.get(worker_key(survivor.address))
    finally:
        await nc.close()

    results = await wait_for_states(gateway_stub, job_ids)
    assert {r.state for r in results.values()} == SUCCEEDED
    assert all(len(r.result.token_ids) == 400 for r in results.values())
    final = dict(zip(job_ids, await job_records(nats_server.url, job_ids), strict=True))
    # The victim's running jobs all ended on the survivor; the survivor's stayed its own.
    moved = [
        owner
        for owner in set(running.values())
        if all(final[j].worker_id != owner for j, o in running.items() if o == owner)
    ]
    assert len(moved) == 1
    assert all(final[j].attempts >= 2 for j, o in running.items() if o == moved[0])
    results_after = await stream_last_seq(nats_server.url, "KV_twolane_results")
    assert results_after - results_before == len(job_ids)
    await eventually(lambda: all(events.count(j) for j in job_ids), "every event arrives")
    await asyncio.sleep(0.5)
    assert [events.count(j) for j in job_ids] == [1] * len(job_ids)
