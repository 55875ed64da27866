"""A gRPC proxy on loopback between a client and a real server.

It forwards every call as bytes, records what passed (method, metadata, request, the
server's first answer), and fails calls on purpose the way a network or a restarting
server does: UNAVAILABLE before a call reaches the server, UNAVAILABLE after the server
answered (the answer is lost), a stream cut after its first message, or UNAVAILABLE for
everything (a server that is stopping). It runs on gRPC's own threads, so blocking and
asyncio tests can use it alike.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import NoReturn

import grpc

_NOT_FORWARDED = ("user-agent",)


@dataclass
class Seen:
    """One call as the proxy saw it."""

    method: str  # the short name: "SubmitJob"
    metadata: dict[str, str]
    request: bytes
    response: bytes | None = None  # the server's answer (a stream's first message)


@dataclass
class Faults:
    """Calls to fail, counted down per short method name."""

    before_forwarding: Counter[str] = field(default_factory=Counter)
    after_forwarding: Counter[str] = field(default_factory=Counter)
    streams_cut_after_first_message: int = 0
    everything_unavailable: bool = False


class GrpcProxy:
    def __init__(self, upstream: str | None) -> None:
        self.faults = Faults()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream) if upstream else None
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GrpcProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        """Close the port (a second call does nothing)."""
        self._server.stop(grace=None).wait()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def calls(self, method: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen if seen.method == method]

    # ---- forwarding -------------------------------------------------------------

    def _record(self, method: str, context: grpc.ServicerContext, request: bytes) -> Seen:
        metadata = {
            key: value for key, value in context.invocation_metadata() if isinstance(value, str)
        }
        seen = Seen(method.rsplit("/", 1)[-1], metadata, request)
        with self._lock:
            self.seen.append(seen)
        return seen

    def _take(self, counter: Counter[str], name: str) -> bool:
        with self._lock:
            if counter[name] <= 0:
                return False
            counter[name] -= 1
            return True

    def _take_stream_cut(self) -> bool:
        with self._lock:
            if self.faults.streams_cut_after_first_message <= 0:
                return False
            self.faults.streams_cut_after_first_message -= 1
            return True

    def _refuse_early(self, seen: Seen, context: grpc.ServicerContext) -> None:
        if self.faults.everything_unavailable or self._channel is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: the server is stopping")
        if self._take(self.faults.before_forwarding, seen.method):
            context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: lost before the server")

    def unary(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen = self._record(method, context, request)
            self._refuse_early(seen, context)
            assert self._channel is not None
            call = self._channel.unary_unary(method)
            try:
                response, outcome = call.with_call(
                    request, metadata=_forwarded(context), timeout=context.time_remaining()
                )
            except grpc.RpcError as err:
                _pass_on(err, context)
            seen.response = response
            if self._take(self.faults.after_forwarding, seen.method):
                context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: the answer was lost")
            context.set_trailing_metadata(outcome.trailing_metadata() or ())
            return response  # type: ignore[no-any-return]

        return forward

    def unary_stream(self, method: str) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        def forward(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            seen = self._record(method, context, request)
            self._refuse_early(seen, context)
            assert self._channel is not None
            responses = self._channel.unary_stream(method)(
                request, metadata=_forwarded(context), timeout=context.time_remaining()
            )
            try:
                for number, message in enumerate(responses):
                    if number == 0:
                        seen.response = message
                    yield message
                    if number == 0 and self._take_stream_cut():
                        responses.cancel()
                        context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: the stream broke")
            except grpc.RpcError as err:
                _pass_on(err, context)
            context.set_trailing_metadata(responses.trailing_metadata() or ())

        return forward


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcProxy) -> None:
        self._proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        if method.endswith("Stream"):
            return grpc.unary_stream_rpc_method_handler(self._proxy.unary_stream(method))
        return grpc.unary_unary_rpc_method_handler(self._proxy.unary(method))


def _forwarded(context: grpc.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata()
        if key not in _NOT_FORWARDED and not key.startswith(("grpc-", ":"))
    )


def _pass_on(err: grpc.RpcError, context: grpc.ServicerContext) -> NoReturn:
    """Answer with the server's status, details (RetryInfo, BadRequest) included."""
    context.set_trailing_metadata(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    context.abort(err.code(), err.details())  # type: ignore[attr-defined]
    raise AssertionError("abort raises")
