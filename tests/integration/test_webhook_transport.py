"""The deliverer's HTTP client against a real server on loopback: it connects to the
address it checked, keeps the name in the Host header, and refuses what the rules refuse
before any byte is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from twolane.services.webhook_transport import (
    MAX_RESPONSE_BYTES,
    RefusedAddressError,
    checked_client,
    post_capped,
)
from twolane.services.webhook_urls import HOSTS_FILE_ENV, UrlPolicy

from .webhook_receiver import Receiver


@pytest.fixture(autouse=True)
def hosts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 pinned.test\n")
    monkeypatch.setenv(HOSTS_FILE_ENV, str(path))
    return path


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = await Receiver().start()
    yield receiver
    await receiver.close()


async def test_the_connection_goes_to_the_checked_address_under_the_name(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would connect anywhere on the deliverer's behalf: none is ever used.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    policy = UrlPolicy(allow_http=True, allow_hosts=("pinned.test",))
    async with checked_client(policy, timeout_s=5.0) as client:
        status, _ = await post_capped(client, receiver.url(host="pinned.test"), b"{}", {})
    assert status == 200
    assert receiver.deliveries[0].host == f"pinned.test:{receiver.port}"


async def test_a_refused_address_is_refused_before_connecting(receiver: Receiver) -> None:
    async with checked_client(UrlPolicy(allow_http=True), timeout_s=5.0) as client:
        for host in ("pinned.test", "127.0.0.1"):
            with pytest.raises(RefusedAddressError, match="loopback"):
                await post_capped(client, receiver.url(host=host), b"{}", {})
    assert receiver.deliveries == []


async def test_redirects_are_not_followed_and_bodies_are_capped() -> None:
    from aiohttp import web

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:1/elsewhere")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (4 * MAX_RESPONSE_BYTES))

    app = web.Application()
    app.router.add_post("/redirect", redirect)
    app.router.add_post("/big", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        policy = UrlPolicy(allow_http=True, allow_private=True)
        async with checked_client(policy, timeout_s=5.0) as client:
            status, _ = await post_capped(client, f"http://127.0.0.1:{port}/redirect", b"", {})
            assert status == 302
            status, body = await post_capped(client, f"http://127.0.0.1:{port}/big", b"", {})
            assert status == 200 and len(body) == MAX_RESPONSE_BYTES
    finally:
        await runner.cleanup()
