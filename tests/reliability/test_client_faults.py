"""Clients that give up: 1,000 mid-stream cancels, disconnects and deadline expiries (100 at
the short size of make test) leave no KV block held and nothing running."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import grpc
import pytest
from integration.serving import ServerProcess, wait_until_idle

from twolane.v1 import generate_pb2, inference_pb2_grpc

from .conftest import Report, soak_or

NUM_CANCELS = soak_or(350, 35)
NUM_DISCONNECTS = soak_or(150, 15)
NUM_DEADLINES = soak_or(500, 50)
CONCURRENCY = 32
# The shared server's context is 64 tokens: a request of 60 runs for tens of steps.
LONG = generate_pb2.SamplingParams(max_tokens=60, ignore_eos=True)


def stream_request(index: int) -> generate_pb2.GenerateStreamRequest:
    return generate_pb2.GenerateStreamRequest(prompt_token_ids=[index % 250 + 1, 2], params=LONG)


async def cancel_mid_stream(stub: inference_pb2_grpc.InferenceServiceStub, index: int) -> str:
    call = stub.GenerateStream(stream_request(index))
    try:
        await call.read()
    except grpc.aio.AioRpcError as err:
        return err.code().name
    call.cancel()
    return "cancelled"


async def disconnect_mid_stream(address: str, index: int) -> str:
    channel = grpc.aio.insecure_channel(address)
    call = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream(stream_request(index))
    try:
        await call.read()
    except grpc.aio.AioRpcError as err:
        return err.code().name
    finally:
        await channel.close(grace=None)
    return "disconnected"


async def expire(stub: inference_pb2_grpc.InferenceServiceStub, index: int) -> str:
    request = generate_pb2.GenerateRequest(prompt_token_ids=[index % 250 + 1, 3], params=LONG)
    timeout_s = random.Random(index).uniform(0.001, 0.04)
    try:
        await stub.Generate(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return "finished"


@pytest.mark.slow
async def test_a_thousand_clients_that_give_up_leave_no_block_held(
    shared_server: ServerProcess, report: Report
) -> None:
    address = shared_server.address
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        faults = (
            [lambda i=i: cancel_mid_stream(stub, i) for i in range(NUM_CANCELS)]
            + [lambda i=i: disconnect_mid_stream(address, i) for i in range(NUM_DISCONNECTS)]
            + [lambda i=i: expire(stub, i) for i in range(NUM_DEADLINES)]
        )
        random.Random(0).shuffle(faults)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def limited(fault: Callable[[], Awaitable[str]]) -> str:
            async with limit:
                return await fault()

        endings = await asyncio.gather(*(limited(f) for f in faults))
        stats = await wait_until_idle(stub, timeout_s=60)
    counts = {ending: endings.count(ending) for ending in set(endings)}
    print(f"client faults: {counts}; after them: {stats}")
    report.record(
        "client_faults",
        faults=len(faults),
        kv_blocks_held=stats.num_used_blocks,
        running=stats.num_running,
        waiting=stats.num_waiting,
    )
    assert set(counts) <= {"cancelled", "disconnected", "DEADLINE_EXCEEDED", "finished"}
    assert counts.get("DEADLINE_EXCEEDED", 0) > NUM_DEADLINES // 2
    assert (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks
