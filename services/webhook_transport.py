"""The deliverer's HTTP client: httpx (HTTP/1.1 and 2, pooled) that connects only to
addresses the SSRF rules allow, checked at the moment of connecting.

httpcore asks its network backend for a TCP connection to (host, port); the backend
here resolves the host once, checks every address (webhook_urls.UrlPolicy), and connects
to a checked address. TLS still verifies the certificate for the host name and sends it
as SNI, and the Host header is the URL's, since the pool keeps working with the name:
only the socket is pinned. No proxy is ever used (one would connect anywhere for us),
no redirect is followed, and response bodies are read up to a cap.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import certifi
import httpcore
import httpx

from twolane.services.webhook_urls import RefusedUrlError, UrlPolicy

MAX_RESPONSE_BYTES = 64 * 1024
MAX_CONNECTIONS = 512
MAX_KEEPALIVE_CONNECTIONS = 128
KEEPALIVE_EXPIRY_S = 30.0
USER_AGENT = "twolane-webhooks/1"


class RefusedAddressError(Exception):
    """The host resolved to an address the rules refuse (or did not resolve) when the
    deliverer connected. Not an httpcore error, so httpx passes it through as it is."""


class CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and pins every connection httpcore opens."""

    def __init__(self, policy: UrlPolicy, inner: httpcore.AsyncNetworkBackend | None = None):
        self._policy = policy
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self._policy.addresses(host, port)
        except RefusedUrlError as exc:
            raise RefusedAddressError(str(exc)) from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedAddressError("webhooks are never delivered over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def ssl_context(ca_file: str = "") -> ssl.SSLContext:
    """Certificates checked against `ca_file`, or certifi's bundle."""
    return ssl.create_default_context(cafile=ca_file or certifi.where())


def checked_client(policy: UrlPolicy, timeout_s: float, ca_file: str = "") -> httpx.AsyncClient:
    """An httpx client whose every connection goes through `CheckedBackend`."""
    context = ssl_context(ca_file)
    transport = httpx.AsyncHTTPTransport(verify=context, http1=True, http2=True, trust_env=False)
    # httpx takes no network backend, so its pool is replaced by one with the same
    # settings and ours (tests/integration/test_webhook_transport.py checks that it is used).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
        http1=True,
        http2=True,
        network_backend=CheckedBackend(policy),
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
    )


async def post_capped(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    """POST and return the status and at most `MAX_RESPONSE_BYTES` of the raw body
    (never decompressed); a longer body is cut off and its connection closed."""
    async with client.stream("POST", url, content=body, headers=headers) as response:
        received = bytearray()
        async for chunk in response.aiter_raw():
            received += chunk
            if len(received) >= MAX_RESPONSE_BYTES:
                break
        return response.status_code, bytes(received[:MAX_RESPONSE_BYTES])
