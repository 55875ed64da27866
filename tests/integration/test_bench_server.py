"""The benchmarks' process starter waits for what each kind of server prints."""

from __future__ import annotations

from twolane.bench.server import start_twolane

from .nats_fixtures import NatsServer


def test_a_server_without_an_http_front_is_started_once_it_listens(
    nats_server: NatsServer,
) -> None:
    # A gateway (as a worker) has no HTTP front: waiting for one would time out.
    gateway = start_twolane(
        ["gateway", "--port", "0", "--nats-url", nats_server.url, "--worker", "127.0.0.1:9"]
    )
    try:
        assert gateway.address.startswith("127.0.0.1:") and not gateway.http_url
        assert gateway.proc is not None and gateway.proc.poll() is None
    finally:
        gateway.stop()
