"""A large request that fails is answered plainly, logs no payload, and stalls nobody.

The request of the report that froze a server for 20 s: a 200 KB SubmitJob holding
20,000 bad token ids and an out-of-range deadline. While such calls are handled one
after another, a stream in flight keeps delivering tokens, and what the server logs
about them is a few short lines.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from integration.serving import ServerProcess

from twolane.services.logging import MAX_TRACEBACK_CHARS, MAX_VALUE_CHARS
from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

BAD_TOKEN_ID = -987_654_321  # a negative int32 takes ten bytes on the wire
MAX_LINE_CHARS = 4 * MAX_VALUE_CHARS + MAX_TRACEBACK_CHARS


def big_bad_job() -> jobs_pb2.SubmitJobRequest:
    request = jobs_pb2.SubmitJobRequest(
        request=generate_pb2.GenerateRequest(prompt_token_ids=[BAD_TOKEN_ID] * 20_000)
    )
    request.deadline.seconds = 253_402_300_800  # a second past year 9999
    assert request.ByteSize() > 200_000
    return request


async def test_a_large_failing_request_logs_no_payload_and_stalls_no_stream(
    shared_server: ServerProcess,
) -> None:
    first_line = len(shared_server.lines)
    events: list[str] = []  # "token" and "bad call pending"/"bad call answered", in order
    async with grpc.aio.insecure_channel(shared_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        params = generate_pb2.SamplingParams(max_tokens=60, ignore_eos=True)
        stream = stub.GenerateStream(
            generate_pb2.GenerateStreamRequest(prompt_token_ids=[5, 6, 7], params=params)
        )
        tokens = list((await stream.read()).token_ids)
        stream_done = asyncio.Event()

        async def read_stream() -> None:
            # read(), as above: a call's iterator and read() may not be mixed.
            while (message := await stream.read()) is not grpc.aio.EOF:
                tokens.extend(message.token_ids)
                events.append("token")
            stream_done.set()

        async def bad_calls() -> int:
            num_calls = 0
            while not stream_done.is_set() or num_calls == 0:
                events.append("bad call pending")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SubmitJob(big_bad_job(), timeout=60)
                events.append("bad call answered")
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert len(info.value.details() or "") < 2000
                num_calls += 1
            return num_calls

        _, num_bad_calls = await asyncio.gather(read_stream(), bad_calls())
        ok = await stub.Generate(
            generate_pb2.GenerateRequest(prompt_token_ids=[1, 2], params=params), timeout=60
        )
    assert len(tokens) == 60 and len(ok.token_ids) == 60
    # Tokens arrived while a bad call was being handled.
    pending = False
    tokens_during_bad_calls = 0
    for event in events:
        if event == "bad call pending":
            pending = True
        elif event == "bad call answered":
            pending = False
        elif pending:
            tokens_during_bad_calls += 1
    assert tokens_during_bad_calls > 0, events

    await asyncio.sleep(0.5)  # the log writer thread has the last lines
    lines = shared_server.lines[first_line:]
    assert lines, "the failures were not logged"
    assert max(len(line) for line in lines) <= MAX_LINE_CHARS
    logged = "".join(lines)
    # The violation names the first bad id once per call; the other 19,999 stay out.
    assert logged.count(str(abs(BAD_TOKEN_ID))) <= num_bad_calls
    assert "Traceback" not in logged
