"""Load: 256 concurrent streams beside 2,000 queued jobs on one server, nothing lost.

Every stream gets all its tokens, every job succeeds once (one event, one result) with
the tokens of an undisturbed run. TTFT and TPOT of the streams are reported.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from integration.nats_fixtures import EventRecorder
from integration.serving import start_server

from twolane.v1 import generate_pb2, inference_pb2_grpc

from .conftest import Report
from .harness import JobRun, outcome, percentile, results_written

NUM_STREAMS = 256
NUM_JOBS = 2000
STREAM_TOKENS = 32
NUM_CHANNELS = 8


async def one_stream(stub: inference_pb2_grpc.InferenceServiceStub, index: int) -> tuple:
    """(TTFT s, TPOT s, tokens, finish reason) of one stream."""
    request = generate_pb2.GenerateStreamRequest(
        prompt_token_ids=[(3 * index + k) % 250 + 1 for k in range(8)],
        params=generate_pb2.SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True),
    )
    started_s = time.perf_counter()
    first_s = last_s = 0.0
    num_tokens = 0
    finish_reason = generate_pb2.FINISH_REASON_UNSPECIFIED
    async for message in stub.GenerateStream(request, timeout=600):
        now_s = time.perf_counter()
        if message.token_ids:
            if not num_tokens:
                first_s = now_s
            last_s = now_s
            num_tokens += len(message.token_ids)
        if message.finish_reason:
            finish_reason = message.finish_reason
    tpot_s = (last_s - first_s) / max(1, num_tokens - 1)
    return first_s - started_s, tpot_s, num_tokens, finish_reason


@pytest.mark.slow
@pytest.mark.soak
async def test_256_streams_beside_2000_queued_jobs_lose_and_double_nothing(
    report: Report, job_reference: list[list[int]]
) -> None:
    server = start_server()
    try:
        nats_url = (server.data_dir / "nats.url").read_text().strip()
        events = await EventRecorder().start(nats_url)
        results_before = await results_written(nats_url)
        run = JobRun(NUM_JOBS)
        await run.submit(server.address, concurrency=32)

        channels = [grpc.aio.insecure_channel(server.address) for _ in range(NUM_CHANNELS)]
        stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
        streams = await asyncio.gather(
            *(one_stream(stubs[i % NUM_CHANNELS], i) for i in range(NUM_STREAMS))
        )
        for channel in channels:
            await channel.close()

        results = await run.wait(server.address, events=events, timeout_s=500)
        checked = await outcome(run, results, job_reference, nats_url, results_before, events)
        await events.close()
    finally:
        server.stop()
    lost_streams = sum(
        1
        for _, _, n, reason in streams
        if n != STREAM_TOKENS or reason != generate_pb2.FINISH_REASON_LENGTH
    )
    ttfts = [s[0] for s in streams]
    tpots = [s[1] for s in streams]
    figures = dict(
        streams=NUM_STREAMS,
        jobs=NUM_JOBS,
        streams_lost=lost_streams,
        jobs_lost=checked.num_lost,
        jobs_duplicated=checked.num_duplicated,
        jobs_wrong=checked.num_wrong,
        ttft_p50_ms=round(1000 * percentile(ttfts, 0.5), 1),
        ttft_p99_ms=round(1000 * percentile(ttfts, 0.99), 1),
        tpot_p50_ms=round(1000 * percentile(tpots, 0.5), 1),
        tpot_p99_ms=round(1000 * percentile(tpots, 0.99), 1),
    )
    print(f"load: {figures}")
    report.record("load", **figures)
    assert lost_streams == 0
    checked.assert_clean()
