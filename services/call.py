"""What every RPC carries through the process: its request id and its trace.

A client-supplied `x-request-id` is kept (a generated one otherwise), returned in the
trailing metadata, and bound into every log line of the call, with the trace id. A
`traceparent` in the metadata makes the call's server span a child of the caller's.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import structlog
from opentelemetry.trace import Span

from twolane.services import tracing

REQUEST_ID_KEY = "x-request-id"
# Longer or stranger ids are replaced, not echoed: they go into logs and headers.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

_CURRENT_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "twolane_request_id", default=""
)


def current_request_id() -> str:
    """The id of the call being handled (empty outside one)."""
    return _CURRENT_REQUEST_ID.get()


def request_id_of(metadata: object) -> str:
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def begin_request(given: str | None) -> str:
    """Make `given` (when it is a fit id, else a new one) the current request id, as an
    HTTP front does with its `X-Request-Id` header; returns the id."""
    request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    _CURRENT_REQUEST_ID.set(request_id)
    return request_id


def open_rpc(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, Span]:
    """Start one RPC: its request id (bound into log lines and the trailing metadata) and
    its server span, started but not made current: see `rpc_scope` and `stream_step`."""
    metadata = context.invocation_metadata()
    request_id = request_id_of(metadata)
    _CURRENT_REQUEST_ID.set(request_id)
    parent = tracing.context_from_metadata(metadata)  # type: ignore[arg-type]
    span = tracing.start_server_span(f"twolane.v1.InferenceService/{method}", parent)
    span.set_attribute("twolane.request_id", request_id)
    structlog.contextvars.bind_contextvars(
        request_id=request_id, trace_id=tracing.span_trace_id(span) or None
    )
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    return request_id, span


@contextmanager
def rpc_scope(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[str]:
    """Around one unary RPC: its request id (yielded), its span made current, log fields."""
    request_id, span = open_rpc(method, context)
    try:
        with stream_step(span):
            yield request_id
    finally:
        span.end()


@contextmanager
def stream_step(span: Span) -> Iterator[None]:
    """`span` current for one stretch of a handler that holds no yield.

    A streaming handler makes its span current around each step to its next message, never
    across a yield: a stream the client leaves is closed later from another context, where
    detaching a context attached here would fail (and log a traceback)."""
    try:
        with tracing.current_span(span):
            yield
    except BaseException as exc:
        tracing.record_error(span, exc)
        raise
