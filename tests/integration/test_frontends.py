"""Several frontend processes share one port and one engine core; a taken port is an error."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest

from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc

from .serving import TWOLANE, ServerProcess, start_server


def logged(server: ServerProcess, event: str) -> list[dict]:
    entries = [json.loads(line) for line in server.lines if line.startswith("{")]
    return [e for e in entries if e.get("event") == event]


@pytest.mark.slow
async def test_two_frontends_share_the_port_and_the_engine_core() -> None:
    server = start_server("--api-server-count", "2", "--log-json")
    try:
        for _ in range(100):
            if len(logged(server, "listening")) == 2:
                break
            await asyncio.sleep(0.05)
        listening = logged(server, "listening")
        assert len({e["pid"] for e in listening}) == 2
        assert {e["port"] for e in listening} == {server.port}

        async def one(i: int) -> generate_pb2.GenerateResponse:
            # A connection each (channels in one process share connections unless told
            # not to): connections, not calls, are spread over the frontends.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(server.address, options=options) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                request = generate_pb2.GenerateRequest(
                    prompt_token_ids=[65, 66, 67],
                    params=generate_pb2.SamplingParams(max_tokens=4, ignore_eos=True),
                )
                return await stub.Generate(request)

        replies = await asyncio.gather(*(one(i) for i in range(24)))
        # One engine, greedy decoding: every frontend returns the same tokens.
        assert len({tuple(r.token_ids) for r in replies}) == 1
        for _ in range(100):
            if len(logged(server, "request finished")) == 24:
                break
            await asyncio.sleep(0.05)
        served_by = {e["pid"] for e in logged(server, "request finished")}
        assert served_by == {e["pid"] for e in listening}
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stats = await stub.GetStats(inference_pb2.GetStatsRequest())
        assert stats.num_running == 0 and stats.num_used_blocks == 0
    finally:
        server.stop()


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_port_already_in_use_is_an_error_not_a_shared_listener(count: str) -> None:
    first = start_server()
    try:
        second = subprocess.run(
            [TWOLANE, "serve", "--port", str(first.port), "--api-server-count", count],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr
        assert "listening" not in second.stderr
    finally:
        first.stop()
