"""Fixtures: one `twolane serve` process on the built-in model, shared by the session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from twolane.v1 import inference_pb2_grpc

from .nats_fixtures import EventRecorder, NatsServer
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


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream of the test module's own, on a free loopback port."""
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture
async def events(nats_server: NatsServer) -> AsyncIterator[EventRecorder]:
    """Every completion event published while the test runs."""
    recorder = await EventRecorder().start(nats_server.url)
    yield recorder
    await recorder.close()
