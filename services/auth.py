"""API-key authentication for the gRPC fronts, as a server interceptor.

Every RPC but health checks and reflection needs `authorization: Bearer <key>` when the
server runs with `--api-keys`. A missing, malformed, unknown or revoked key gets the same
UNAUTHENTICATED answer, so nothing can be learnt from the difference. The caller's
`Principal` (tenant, key id, limits) is then available to the handler through
`current_principal()`, and bound into every log line of the call.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc
import structlog

from twolane.services.keys import ANONYMOUS, KeyStore, Principal

UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send `authorization: Bearer <key>`"
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")

# What an asyncio server's method handler holds: coroutine functions of an aio context.
# The grpc stubs type RpcMethodHandler's callables for the threaded server.
_AioUnary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
_AioUnaryStream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]

_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "twolane_principal", default=ANONYMOUS
)


def current_principal() -> Principal:
    """Who the RPC being handled comes from (the default tenant when auth is off)."""
    return _PRINCIPAL.get()


def enter_principal(principal: Principal) -> None:
    """Make `principal` the caller of the call being handled, in the code and the logs."""
    _PRINCIPAL.set(principal)
    structlog.contextvars.bind_contextvars(tenant=principal.tenant, key_id=principal.key_id)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails],
            Awaitable[grpc.RpcMethodHandler[_TRequest, _TResponse] | None],
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata
        principal = self._keys.authenticate(bearer_token(metadata))
        return _with_principal(handler, principal)


def _with_principal(
    handler: grpc.RpcMethodHandler[Any, Any], principal: Principal | None
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, run as `principal`, or refusing every call when it is None."""

    def enter() -> None:
        enter_principal(principal or ANONYMOUS)

    if handler.unary_unary is not None:
        inner = cast(_AioUnary, handler.unary_unary)

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if principal is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            enter()
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = cast(_AioUnaryStream, handler.unary_stream)

        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if principal is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
            enter()
            async for message in inner_stream(request, context):
                yield message

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    return handler  # no streaming-request methods in the API
