"""A full interactive queue refuses at once; SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc

from .serving import ServerProcess, start_server, wait_until_idle

LONG = generate_pb2.SamplingParams(max_tokens=2000, ignore_eos=True)


@pytest.fixture(scope="module")
def one_seat_server() -> Iterator[ServerProcess]:
    """One running sequence at a time and room for one waiting request; JSON logs."""
    server = start_server("--max-num-seqs", "1", "--max-waiting", "1", "--log-json")
    yield server
    server.stop()


@pytest.fixture
async def one_seat_stub(
    one_seat_server: ServerProcess,
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(one_seat_server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def wait_for_waiting(stub: inference_pb2_grpc.InferenceServiceStub, num: int) -> None:
    for _ in range(600):
        stats = await stub.GetStats(inference_pb2.GetStatsRequest())
        if stats.num_waiting >= num:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"never saw {num} waiting requests")


async def test_over_the_waiting_bound_is_resource_exhausted_at_once(
    one_seat_stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    stub = one_seat_stub
    running = stub.GenerateStream(generate_pb2.GenerateStreamRequest(prompt="a", params=LONG))
    await running.read()
    waiting = stub.GenerateStream(generate_pb2.GenerateStreamRequest(prompt="b", params=LONG))
    await wait_for_waiting(stub, 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_pb2.GenerateRequest(prompt="c", params=LONG))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    running.cancel()
    waiting.cancel()
    stats = await wait_until_idle(stub)
    assert stats.num_used_blocks == 0
    ok = await stub.Generate(
        generate_pb2.GenerateRequest(prompt="d", params=generate_pb2.SamplingParams(max_tokens=2))
    )
    assert len(ok.token_ids) == 2


def test_json_logs_carry_the_listening_port(one_seat_server: ServerProcess) -> None:
    events = [json.loads(line) for line in one_seat_server.lines if line.startswith("{")]
    listening = [e for e in events if e["event"] == "listening"]
    assert listening and listening[0]["port"] == one_seat_server.port


async def test_sigterm_lets_in_flight_requests_finish_then_exits_zero() -> None:
    server = start_server("--grace-period", "60")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            params = generate_pb2.SamplingParams(max_tokens=500, ignore_eos=True)
            call = stub.GenerateStream(
                generate_pb2.GenerateStreamRequest(prompt="x", params=params)
            )
            chunks = [await call.read()]
            server.proc.terminate()
            while (chunk := await call.read()) is not grpc.aio.EOF:
                chunks.append(chunk)
        assert chunks[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 500
        assert await asyncio.to_thread(server.proc.wait, 60) == 0
        drain_line = next(i for i, line in enumerate(server.lines) if "draining" in line)
        finish_line = next(i for i, line in enumerate(server.lines) if "request finished" in line)
        assert drain_line < finish_line, "the request was not in flight when the drain began"
    finally:
        server.stop()
