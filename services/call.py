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

import grpc
import structlog

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


@contextmanager
def rpc_scope(method: str, context: grpc.aio.ServicerContext) -> Iterator[str]:
    """Around one RPC: its request id (yielded), its server span, its log fields."""
    metadata = context.invocation_metadata()
    request_id = request_id_of(metadata)
    _CURRENT_REQUEST_ID.set(request_id)
    parent = tracing.context_from_metadata(metadata)  # type: ignore[arg-type]
    with tracing.server_span(f"twolane.v1.InferenceService/{method}", parent) as span:
        span.set_attribute("twolane.request_id", request_id)
        structlog.contextvars.bind_contextvars(
            request_id=request_id, trace_id=tracing.current_trace_id() or None
        )
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            yield request_id
        except BaseException as exc:
            tracing.record_error(span, exc)
            raise
