"""Cancelled, disconnected and timed-out requests leave no KV blocks behind."""

from __future__ import annotations

import grpc
import pytest

from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc

from .serving import ServerProcess, wait_until_idle

# Long enough that the request is still generating when the client gives up.
# Near the built-in model's 2048-token context: seconds of work, far past the deadlines below.
LONG = generate_pb2.SamplingParams(max_tokens=2000, ignore_eos=True)


async def assert_blocks_held(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    stats = await stub.GetStats(inference_pb2.GetStatsRequest())
    assert stats.num_running >= 1
    assert stats.num_used_blocks > 0


async def assert_no_blocks_held(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    stats = await wait_until_idle(stub)
    assert (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks


async def test_cancelling_mid_stream_frees_the_requests_blocks(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    call = stub.GenerateStream(generate_pb2.GenerateStreamRequest(prompt="cancel", params=LONG))
    await call.read()
    await call.read()
    await assert_blocks_held(stub)
    assert call.cancel()
    assert await call.code() is grpc.StatusCode.CANCELLED
    await assert_no_blocks_held(stub)


async def test_disconnecting_mid_stream_frees_the_requests_blocks(
    server: ServerProcess, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    channel = grpc.aio.insecure_channel(server.address)
    own_stub = inference_pb2_grpc.InferenceServiceStub(channel)
    call = own_stub.GenerateStream(generate_pb2.GenerateStreamRequest(prompt="bye", params=LONG))
    await call.read()
    await assert_blocks_held(stub)
    await channel.close(grace=None)
    await assert_no_blocks_held(stub)


async def test_deadline_mid_stream_is_deadline_exceeded_and_frees_blocks(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    request = generate_pb2.GenerateStreamRequest(prompt="slow", params=LONG)
    call = stub.GenerateStream(request, timeout=0.5)
    first = await call.read()
    assert len(first.token_ids) >= 1  # generation had started before the deadline
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_no_blocks_held(stub)


async def test_deadline_on_unary_generate_frees_blocks(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_pb2.GenerateRequest(prompt="slow", params=LONG), timeout=0.5)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_no_blocks_held(stub)


async def test_streams_left_mid_way_leave_no_traceback_in_the_log(
    server: ServerProcess, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    """A stream the client leaves is closed by the server later, from another context; its
    trace span must not have been left attached across that (OpenTelemetry logs a
    'Failed to detach context' traceback when it is)."""
    for _ in range(8):
        call = stub.GenerateStream(generate_pb2.GenerateStreamRequest(prompt="go", params=LONG))
        await call.read()
        assert call.cancel()
        channel = grpc.aio.insecure_channel(server.address)
        own_stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = generate_pb2.GenerateStreamRequest(prompt="away", params=LONG)
        own_call = own_stub.GenerateStream(request)
        await own_call.read()
        await channel.close(grace=None)
    await assert_no_blocks_held(stub)
    assert "Failed to detach context" not in server.log_text()
    assert "Traceback" not in server.log_text()
