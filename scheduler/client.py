"""The asyncio client of one engine core: what frontends and the job runner talk to.

No torch here. A client owns a DEALER socket to the core's ROUTER (commands out, its
own requests' outputs back) and a SUB socket for the core's load. A socket monitor
tells it at once when the core goes away: every request in flight then ends with
ErrorCode.ENGINE_DEAD, new requests are refused with EngineStoppedError, and when
the core is back (ZMQ reconnects by itself) the client says Hello again and is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from twolane.scheduler.errors import EngineStoppedError
from twolane.scheduler.protocol import (
    AbortRequests,
    AddRequest,
    Command,
    EngineAddress,
    EngineInfo,
    EngineStats,
    GetStats,
    Hello,
    Load,
    StatsReply,
    StepOutputs,
    TokenOutput,
    command_encoder,
    final_output,
    load_decoder,
    reply_decoder,
)
from twolane.scheduler.request import ErrorCode, Priority, SamplingParams

log = structlog.get_logger(__name__)

# A core mid-way through a long step answers at its next safe point (between layers); this
# long without an answer means it is stuck. A caller's own deadline ends the wait sooner.
STATS_TIMEOUT_S = 30.0
# The core answers ZMTP pings from its I/O thread even mid-step; a core that stops
# answering (frozen, or its machine gone) counts as dead after this long.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 3000
RECONNECT_IVL_MS = 100


class RequestStream:
    """Async iterator over one request's outputs. Leaving it early aborts the request."""

    def __init__(self, request_id: str, client: EngineClient) -> None:
        self.request_id = request_id
        self._client = client
        self._queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[TokenOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenOutput]:
        try:
            while not self.finished:
                out = await self._queue.get()
                self.finished = out.finished
                yield out
        finally:
            # Reached on normal completion, an exception, cancellation or an early break.
            self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading: the request is aborted and its outputs are no longer kept."""
        if not self.finished:
            self.finished = True
            self._client._forget(self.request_id)

    def _put(self, out: TokenOutput) -> None:
        self._queue.put_nowait(out)


class EngineClient:
    """Requests, aborts and stats for one engine core at `address`.

    Args:
        address: the core's sockets.
        name: how the core's log names this client.
    """

    def __init__(self, address: EngineAddress, name: str) -> None:
        self.address = address
        self.name = name
        self._ctx = zmq.asyncio.Context()
        self._dealer: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._streams: dict[str, RequestStream] = {}
        self._stats_calls: dict[int, asyncio.Future[EngineStats]] = {}
        self._call_ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._listeners: list[Callable[[bool], None]] = []
        self._load_changed = asyncio.Event()
        self.info: EngineInfo | None = None
        self.load: Load | None = None
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect; returns at once. `wait_ready` waits for the core's Hello answer."""
        dealer = self._ctx.socket(zmq.DEALER)
        identity = f"{self.name}-{os.getpid()}-{id(self):x}".encode()
        dealer.setsockopt(zmq.ROUTING_ID, identity)
        # Never queue commands for a core that is not there: a restarted core must not
        # receive requests meant for the one that died.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        dealer.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        # Hello goes out once the ZMTP handshake is done: before that, IMMEDIATE still
        # refuses to queue the message.
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        dealer.connect(self.address.commands)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.CONFLATE, 1)  # only the newest load matters
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.address.load)
        self._dealer, self._sub, self._monitor = dealer, sub, monitor
        self._tasks = [
            asyncio.create_task(self._receive_loop(dealer), name="twolane-engine-recv"),
            asyncio.create_task(self._monitor_loop(monitor), name="twolane-engine-monitor"),
            asyncio.create_task(self._load_loop(sub), name="twolane-engine-load"),
        ]

    async def wait_ready(self, timeout_s: float | None = None) -> EngineInfo:
        """Wait until the core has answered Hello (it may still be loading its model)."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        assert self.info is not None
        return self.info

    async def wait_ready_unless(self, stop: asyncio.Event) -> EngineInfo | None:
        """The core's info once it answers, or None if `stop` is set first."""
        ready = asyncio.ensure_future(self.wait_ready())
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (ready, stopping):
            if task not in done:
                task.cancel()
        return ready.result() if ready in done else None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(ErrorCode.ENGINE_STOPPING, "the engine client closed")
        if self._dealer is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.disable_monitor()
        for sock in (self._monitor, self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.destroy(linger=0)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    def add_ready_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(ready)` whenever the core comes up or goes away."""
        self._listeners.append(listener)

    # ---- requests ----------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: Priority = Priority.INTERACTIVE,
        deadline_s: float | None = None,
        stream: bool = True,
        tenant: str = "default",
    ) -> RequestStream:
        """Queue a validated request; iterate the returned stream for its outputs.

        Raises:
            EngineStoppedError: the core is not there (starting, restarting or gone).
            ValueError: `request_id` is in use by a request of this client.
        """
        if not self.is_ready or self._dealer is None:
            raise EngineStoppedError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        request_stream = RequestStream(request_id, self)
        self._streams[request_id] = request_stream
        command = AddRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            priority=priority,
            arrival_time_s=time.monotonic(),
            deadline_s=deadline_s,
            stream=stream,
            tenant=tenant,
        )
        if not self._send(command):
            del self._streams[request_id]
            raise EngineStoppedError("the engine is not running")
        return request_stream

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream then ends with FinishReason.ABORT. Harmless if the
        request already finished."""
        if request_id in self._streams:
            self._send(AbortRequests([request_id]))

    def _forget(self, request_id: str) -> None:
        """Abort a request whose stream nobody reads any more."""
        if self._streams.pop(request_id, None) is not None:
            self._send(AbortRequests([request_id]))

    async def stats(self) -> EngineStats:
        if not self.is_ready:
            raise EngineStoppedError("the engine is not running")
        call_id = next(self._call_ids)
        future: asyncio.Future[EngineStats] = asyncio.get_running_loop().create_future()
        self._stats_calls[call_id] = future
        try:
            if not self._send(GetStats(call_id)):
                raise EngineStoppedError("the engine is not running")
            return await asyncio.wait_for(future, STATS_TIMEOUT_S)
        except TimeoutError as exc:
            raise EngineStoppedError("the engine did not answer") from exc
        finally:
            self._stats_calls.pop(call_id, None)

    async def wait_load_change(self, timeout_s: float) -> None:
        """Return when a new load arrives or after `timeout_s`."""
        self._load_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._load_changed.wait(), timeout_s)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def held_for_tenant(self, tenant: str) -> int | None:
        """Requests the core holds for `tenant` (every client's), as of its last load."""
        if self.load is None:
            return None
        return self.load.num_requests_by_tenant.get(tenant, 0)

    # ---- sockets -----------------------------------------------------------------

    def _send(self, command: Command) -> bool:
        """Send without waiting; False when no core is connected (IMMEDIATE refuses to
        queue). The asyncio socket's send is used, not a synchronous shadow of it: the
        socket's file descriptor signals edges, and only the asyncio wrapper knows to look
        for pending replies again after a send has consumed one."""
        if self._dealer is None or self._closed:
            return False
        # An asyncio socket's send returns a Future; pyzmq annotates it as an Awaitable.
        sent = cast(
            "asyncio.Future[zmq.MessageTracker | None]",
            self._dealer.send(command_encoder.encode(command), zmq.NOBLOCK),
        )
        if not sent.done():  # cannot happen with NOBLOCK; never leave a send unobserved
            sent.add_done_callback(lambda f: f.exception())
            return True
        error = sent.exception()
        if isinstance(error, zmq.Again):
            return False
        if error is not None:
            raise error
        return True

    async def _receive_loop(self, dealer: zmq.asyncio.Socket) -> None:
        while True:
            payload = await dealer.recv()
            try:
                reply = reply_decoder.decode(payload)
            except Exception:
                log.error("unreadable engine reply dropped")
                continue
            if isinstance(reply, StepOutputs):
                self._dispatch(reply.outputs)
            elif isinstance(reply, StatsReply):
                future = self._stats_calls.get(reply.call_id)
                if future is not None and not future.done():
                    future.set_result(reply.stats)
            elif isinstance(reply, EngineInfo):
                self._on_info(reply)

    def _dispatch(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream._put(out)

    def _on_info(self, info: EngineInfo) -> None:
        restarted = self.info is not None and self.info.instance_id != info.instance_id
        self.info = info
        self.load = info.load
        if not self._ready.is_set():
            self._ready.set()
            log.info("engine ready", instance_id=info.instance_id, restarted=restarted)
            self._notify(True)

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._send(Hello(self.name))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._on_engine_gone()

    def _on_engine_gone(self) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        self._fail_all(ErrorCode.ENGINE_DEAD, "the engine core went away")
        if was_ready:
            log.error("engine core gone")
            self._notify(False)

    def _fail_all(self, code: ErrorCode, error: str) -> None:
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            stream._put(final_output(request_id, code, error))
        for future in self._stats_calls.values():
            if not future.done():
                future.set_exception(EngineStoppedError(error))

    def _notify(self, ready: bool) -> None:
        for listener in self._listeners:
            listener(ready)

    async def _load_loop(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            payload = await sub.recv()
            with contextlib.suppress(Exception):
                self.load = load_decoder.decode(payload)
                self._load_changed.set()
