"""The one place where exceptions become gRPC status codes.

Every servicer method is wrapped with `grpc_errors`. Bad input surfaces as
INVALID_ARGUMENT with `google.rpc.BadRequest` details naming the fields; an
unexpected exception is logged with its traceback here and reaches the client
only as a terse INTERNAL status, never as a traceback.

A status travels in trailing metadata (`grpc-message`, and `grpc-status-details-bin`
repeating it), so what it says is bounded here, whatever raised it: a message that
outgrew the client's metadata limit would reach the client as RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import collections
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from twolane.scheduler.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from twolane.services.call import (
    REQUEST_ID_KEY,
    current_request_id,
    open_rpc,
    rpc_scope,
    stream_step,
)
from twolane.services.errors import (
    FieldViolation,
    InvalidArgumentError,
    RateLimitedError,
    ServiceError,
)

log = structlog.get_logger(__name__)

# The trailing-metadata key of a status's google.rpc.Status (grpc_status writes it).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
MAX_MESSAGE_CHARS = 1024
MAX_VIOLATIONS = 16
MAX_DESCRIPTION_CHARS = 256
# A full interactive queue drains within a few steps: try again soon.
QUEUE_FULL_RETRY_S = 0.5

_ENGINE_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
}


def to_status(exc: Exception) -> grpc.Status:
    """The status a caller sees for `exc`."""
    violations: tuple[FieldViolation, ...] = ()
    if isinstance(exc, InvalidArgumentError):
        violations = exc.violations
    elif isinstance(exc, InvalidRequestError):
        violations = (FieldViolation(exc.field, exc.description),)

    if isinstance(exc, ServiceError):
        code, message = exc.code, str(exc)
    else:
        engine_code = next((c for t, c in _ENGINE_CODES.items() if isinstance(exc, t)), None)
        if engine_code is None:
            # The details of an unexpected failure stay in the server log.
            code, message = grpc.StatusCode.INTERNAL, "internal error"
        else:
            code, message = engine_code, str(exc)
    if not message:
        message = code.name.lower().replace("_", " ")
    retry_after_s = exc.retry_after_s if isinstance(exc, RateLimitedError) else None
    if isinstance(exc, QueueFullError):
        retry_after_s = QUEUE_FULL_RETRY_S
    return _status(code, _bounded(message, MAX_MESSAGE_CHARS), violations, retry_after_s)


def _bounded(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... ({len(text) - max_chars} more characters)"


def _status(
    code: grpc.StatusCode,
    message: str,
    violations: tuple[FieldViolation, ...],
    retry_after_s: float | None = None,
) -> grpc.Status:
    details = []
    if retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(max(0.0, retry_after_s) * 1e9))
        packed_retry = any_pb2.Any()
        packed_retry.Pack(retry)
        details.append(packed_retry)
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_bounded(v.field, MAX_DESCRIPTION_CHARS),
                    description=_bounded(v.description, MAX_DESCRIPTION_CHARS),
                )
                for v in violations[:MAX_VIOLATIONS]
            ]
        )
        details.append(_packed(bad_request))
    rpc_code = code_pb2.Code.Value(code.name)
    return rpc_status.to_status(status_pb2.Status(code=rpc_code, message=message, details=details))


def _packed(detail: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


class _Status(
    collections.namedtuple("_Status", ("code", "details", "trailing_metadata")),
    grpc.Status,
):
    """A status with the trailing metadata we add (as grpc_status builds its own)."""


Handler = TypeVar("Handler", bound=Callable[..., Any])


def grpc_errors(handler: Handler) -> Handler:
    """Wrap a unary or server-streaming aio handler so errors become statuses."""
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            _, span = open_rpc(handler.__name__, context)
            messages = handler(self, request, context)
            try:
                while True:
                    with stream_step(span):
                        try:
                            message = await anext(messages)
                        except StopAsyncIteration:
                            return
                        except grpc.aio.AbortError:
                            raise
                        except Exception as exc:
                            await _abort(context, handler.__name__, exc)
                    yield message
            finally:
                with stream_step(span):
                    await messages.aclose()
                span.end()

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary_wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        with rpc_scope(handler.__name__, context):
            try:
                return await handler(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, handler.__name__, exc)

    return unary_wrapper  # type: ignore[return-value]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
    status = to_status(exc)
    # The request id goes back on errors too (aborting replaces the trailing metadata).
    status = _Status(
        status.code,
        status.details,
        (*(status.trailing_metadata or ()), (REQUEST_ID_KEY, current_request_id())),
    )
    if status.code is grpc.StatusCode.INTERNAL and not isinstance(exc, ServiceError):
        log.exception("unhandled error", method=method)
    else:
        log.info("request failed", method=method, code=status.code.name, error=status.details)
    await context.abort_with_status(status)
