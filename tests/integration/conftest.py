"""Fixtures: one `twolane serve` process on the built-in model, shared by the session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from twolane.v1 import inference_pb2_grpc

from .serving import ServerProcess, start_server


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The built-in model with default settings, as `make run` starts it."""
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
async def stub(server: ServerProcess) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
