"""Webhook receivers for tests: real HTTP servers on 127.0.0.1 (aiohttp), and an endpoint
that accepts connections and never answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web


@dataclass(frozen=True)
class Delivery:
    """One POST as the receiver got it."""

    headers: dict[str, str]
    body: bytes
    received_s: float  # time.monotonic()
    host: str

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def job_id(self) -> str:
        return str(json.loads(self.body)["data"]["job_id"])


@dataclass
class Receiver:
    """Records every POST and answers with `statuses` in turn, then `default_status`.

    `delay_s` holds each answer back that long (a slow receiver).
    """

    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    delay_s: float = 0.0
    ssl_context: ssl.SSLContext | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.deliveries.append(
            Delivery(headers, body, time.monotonic(), request.headers.get("Host", ""))
        )
        self._arrived.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.pop(0) if self.statuses else self.default_status
        return web.Response(status=status, text="ok" if status < 300 else "receiver says no")

    async def wait_for(self, count: int, timeout_s: float = 60.0) -> list[Delivery]:
        """At least `count` deliveries (fails the test if they do not come in time)."""
        give_up_at = time.monotonic() + timeout_s
        while len(self.deliveries) < count:
            remaining_s = give_up_at - time.monotonic()
            if remaining_s <= 0:
                pytest.fail(f"{len(self.deliveries)} of {count} webhook deliveries arrived")
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining_s, 0.5))
        return list(self.deliveries)

    def job_ids(self) -> set[str]:
        return {d.job_id for d in self.deliveries}


@dataclass
class DeadEndpoint:
    """Accepts connections and never answers; counts them."""

    port: int = 0
    num_accepted: int = 0
    num_open: int = 0
    max_open: int = 0
    num_closed: int = 0
    _server: asyncio.AbstractServer | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> DeadEndpoint:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.num_accepted += 1
        self.num_open += 1
        self.max_open = max(self.max_open, self.num_open)
        try:
            while await reader.read(65536):
                pass  # read what comes, never answer
        finally:
            self.num_open -= 1
            self.num_closed += 1
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
