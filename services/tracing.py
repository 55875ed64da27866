"""OpenTelemetry traces, off and free unless the standard OTEL_* variables ask for them.

Set `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
`OTEL_TRACES_EXPORTER=otlp`) and every twolane process exports its spans over OTLP/HTTP
(protobuf), batched; `OTEL_SERVICE_NAME` and the other standard variables apply. Unset,
the API's no-op tracer is used and a span costs next to nothing.

The context travels as a W3C `traceparent`: in gRPC metadata from the caller, in NATS
headers on a job's ticket and on its completion event, so that one trace spans
submit -> queue -> worker -> event.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_ENABLING_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
)

tracer = trace.get_tracer("twolane")


def tracing_requested() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter and exporter.lower() == "none":
        return False
    return any(os.environ.get(name) for name in _ENABLING_VARIABLES)


def setup_tracing(process: str) -> None:
    """Install an exporting tracer provider for this process, when asked to."""
    if not tracing_requested():
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME", "twolane")
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "twolane.process": process})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    """Flush what is buffered (a process that exits loses unflushed spans otherwise)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


def context_from_metadata(
    metadata: Sequence[tuple[str, str | bytes]] | None,
) -> otel_context.Context:
    """The caller's trace context from gRPC metadata (`traceparent`), if it sent one."""
    carrier = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def context_from_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a NATS message carries in its headers."""
    return propagate.extract(dict(headers or {}))


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers` with the current trace context added (`traceparent`)."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def start_server_span(name: str, parent: otel_context.Context) -> Span:
    """A span for one RPC, under the caller's trace (or a new one); the caller ends it."""
    return tracer.start_span(name, context=parent, kind=SpanKind.SERVER)


def span_trace_id(span: Span) -> str:
    span_context = span.get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


@contextmanager
def current_span(span: Span) -> Iterator[None]:
    """`span` is the current span inside (its end is the caller's business)."""
    with trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    ):
        yield


def record_error(span: Span, exc: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def past_span_wall(name: str, start_unix_ns: int, **attributes: Any) -> None:
    """A child span of the current one from a wall-clock start (a job's time in the
    queue, from its record's creation) until now."""
    tracer.start_span(name, start_time=start_unix_ns, attributes=attributes).end()


def past_span(
    name: str, start_monotonic_s: float, end_monotonic_s: float, **attributes: Any
) -> None:
    """A child span of the current one for a phase whose times are known afterwards
    (queue wait, prefill, decode: the engine core reports them with the outputs)."""
    if end_monotonic_s < start_monotonic_s:
        return
    offset_ns = time.time_ns() - time.monotonic_ns()
    span = tracer.start_span(
        name,
        start_time=int(start_monotonic_s * 1e9) + offset_ns,
        attributes=attributes,
    )
    span.end(end_time=int(end_monotonic_s * 1e9) + offset_ns)
