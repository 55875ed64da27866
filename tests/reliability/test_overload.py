"""Overload: clients retrying with exponential backoff and jitter against a saturated server.

The server sheds what it cannot start soon (`--max-queue-delay-s`) with RESOURCE_EXHAUSTED
and a RetryInfo delay, instead of queueing it: the accepted requests' time to first token
stays near the unloaded one, and no client's request is lost to a timeout cascade (each
succeeds after its retries). The TTFT figures go to the report; they are not asserted.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from integration.serving import start_server

from twolane.v1 import generate_pb2, inference_pb2_grpc

from .conftest import Report
from .harness import percentile

NUM_CLIENTS = 48
REQUESTS_PER_CLIENT = 8
MAX_NUM_SEQS = 4
QUEUE_DELAY_S = 0.005
MAX_ATTEMPTS = 200
PARAMS = generate_pb2.SamplingParams(max_tokens=16, ignore_eos=True)


@dataclass
class Tally:
    ttfts_s: list[float] = field(default_factory=list)
    num_shed: int = 0
    num_without_retry_info: int = 0
    other_errors: list[str] = field(default_factory=list)


def retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


async def first_token_s(stub: inference_pb2_grpc.InferenceServiceStub, index: int) -> float:
    request = generate_pb2.GenerateStreamRequest(
        prompt_token_ids=[index % 250 + 1, 9], params=PARAMS
    )
    started_s = time.perf_counter()
    ttft_s = 0.0
    async for message in stub.GenerateStream(request, timeout=60):
        if message.token_ids and not ttft_s:
            ttft_s = time.perf_counter() - started_s
    return ttft_s


async def client(stub: inference_pb2_grpc.InferenceServiceStub, number: int, tally: Tally) -> None:
    """REQUESTS_PER_CLIENT requests, each retried on RESOURCE_EXHAUSTED after the larger of
    the server's retry delay and an exponential backoff with full jitter."""
    rng = random.Random(number)
    for index in range(REQUESTS_PER_CLIENT):
        backoff_s = 0.01
        for _ in range(MAX_ATTEMPTS):
            try:
                tally.ttfts_s.append(await first_token_s(stub, number * 100 + index))
                break
            except grpc.aio.AioRpcError as err:
                if err.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    tally.other_errors.append(err.code().name)
                    break
                tally.num_shed += 1
                server_delay_s = retry_delay_s(err)
                if server_delay_s is None:
                    tally.num_without_retry_info += 1
                await asyncio.sleep(max(server_delay_s or 0.0, rng.uniform(0, backoff_s)))
                backoff_s = min(1.0, backoff_s * 2)
        else:
            tally.other_errors.append("gave up")


@pytest.mark.slow
@pytest.mark.soak
async def test_a_saturated_server_sheds_with_retry_info_and_keeps_ttft(report: Report) -> None:
    server = start_server(
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue-delay-s", str(QUEUE_DELAY_S)
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            unloaded = [await first_token_s(stub, i) for i in range(40)]
            tally = Tally()
            started_s = time.perf_counter()
            await asyncio.gather(*(client(stub, n, tally) for n in range(NUM_CLIENTS)))
            loaded_s = time.perf_counter() - started_s
    finally:
        server.stop()
    figures = dict(
        clients=NUM_CLIENTS,
        requests=NUM_CLIENTS * REQUESTS_PER_CLIENT,
        shed=tally.num_shed,
        unloaded_ttft_p50_ms=round(1000 * percentile(unloaded, 0.5), 1),
        unloaded_ttft_p99_ms=round(1000 * percentile(unloaded, 0.99), 1),
        accepted_ttft_p50_ms=round(1000 * percentile(tally.ttfts_s, 0.5), 1),
        accepted_ttft_p99_ms=round(1000 * percentile(tally.ttfts_s, 0.99), 1),
        wall_s=round(loaded_s, 1),
    )
    figures["ttft_p50_ratio"] = round(
        figures["accepted_ttft_p50_ms"] / max(0.1, figures["unloaded_ttft_p50_ms"]), 2
    )
    print(f"overload: {figures}")
    report.record("overload", **figures)
    assert tally.other_errors == []
    assert len(tally.ttfts_s) == NUM_CLIENTS * REQUESTS_PER_CLIENT  # every request got through
    assert tally.num_shed > 0, "the server was never saturated"
    assert tally.num_without_retry_info == 0
