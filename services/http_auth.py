"""Around every HTTP call: its request id, its server span, and who is calling.

The HTTP front's counterpart of services/call.py and services/auth.py for gRPC, as
one ASGI middleware, so no route can forget it. A client's `X-Request-Id` is kept (a
generated one otherwise) and returned on every response; a `traceparent` header makes
the call's span a child of the caller's. With `--api-keys`, every path but `/health`
needs `Authorization: Bearer <key>` and the same keys and tenants as gRPC: a missing,
malformed, unknown or revoked key is one 401 in OpenAI's shape. The route then reads
its caller with `current_principal()`, as a servicer does.
"""

from __future__ import annotations

import msgspec
import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twolane.services import tracing
from twolane.services.auth import bearer_token, enter_principal
from twolane.services.call import REQUEST_ID_KEY, begin_request, stream_step
from twolane.services.keys import ANONYMOUS, KeyStore
from twolane.services.openai_format import error_body

# Probes need no key, as gRPC's health service needs none.
OPEN_PATHS = frozenset({"/health"})
UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send `Authorization: Bearer <key>`"
_encode = msgspec.json.Encoder().encode


class CallScope:
    """The ASGI middleware (see the module docstring); `keys` None: auth is off and every
    caller is the default tenant."""

    def __init__(self, app: ASGIApp, keys: KeyStore | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = begin_request(headers.get(REQUEST_ID_KEY))
        parent = tracing.context_from_metadata(list(headers.items()))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REQUEST_ID_KEY, request_id)
            await send(message)

        span = tracing.start_server_span(f"HTTP {scope['method']} {scope['path']}", parent)
        span.set_attribute("twolane.request_id", request_id)
        structlog.contextvars.bind_contextvars(
            request_id=request_id, trace_id=tracing.span_trace_id(span) or None
        )
        try:
            # Current around the whole call: the app is one coroutine of this task (a
            # stream's body is sent from inside it), never a generator left open.
            with stream_step(span):
                principal = ANONYMOUS
                if self.keys is not None and scope["path"] not in OPEN_PATHS:
                    found = self.keys.authenticate(bearer_token(list(headers.items())))
                    if found is None:
                        await _unauthenticated(send_with_id)
                        return
                    principal = found
                enter_principal(principal)
                await self.app(scope, receive, send_with_id)
        finally:
            span.end()


async def _unauthenticated(send: Send) -> None:
    body = _encode(
        error_body(UNAUTHENTICATED_MESSAGE, "invalid_request_error", None, "invalid_api_key")
    )
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
