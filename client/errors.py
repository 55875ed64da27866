"""Typed exceptions for the statuses a twolane server answers with.

Every failed call raises a `TwolaneError` subclass chosen by the status code, never a
raw `grpc.RpcError`. The error keeps what the server said: the message, the request id
(`x-request-id`, to find the call in the server's logs), the fields of a bad request
(google.rpc.BadRequest) and when to try again (google.rpc.RetryInfo).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID_KEY = "x-request-id"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its path (`params.top_p`)."""

    field: str
    description: str


class TwolaneError(Exception):
    """A call failed; `code` is the gRPC status the server (or the channel) gave."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str = "",
        retry_after_s: float | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.request_id = request_id
        # When the server said trying again can work (RetryInfo); None when it did not.
        self.retry_after_s = retry_after_s
        self.field_violations = field_violations

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} (request id {self.request_id})" if self.request_id else text


class InvalidArgument(TwolaneError):
    """The request is malformed; `field_violations` names each bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TwolaneError):
    """No such job (or not one of this tenant's)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TwolaneError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TwolaneError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(TwolaneError):
    """No API key, or one the server does not know (or has revoked)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TwolaneError):
    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(TwolaneError):
    """RESOURCE_EXHAUSTED: over a quota or a queue bound. `retry_after_s` is the
    server's RetryInfo delay, None when it sent none."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TwolaneError):
    """The server cannot be reached, is stopping, or lost its job queue."""

    code = grpc.StatusCode.UNAVAILABLE


class EventsUnreachable(Unavailable):
    """`watch()` cannot read completion events: no NATS URL, or NATS cannot be reached
    (or refuses these credentials)."""


class DeadlineExceeded(TwolaneError, TimeoutError):
    """The call's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(TwolaneError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(TwolaneError):
    """The server lacks what the call needs (a server without the batch lane)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TwolaneError):
    """The server failed; not the caller's fault (INTERNAL, UNKNOWN, DATA_LOSS)."""

    code = grpc.StatusCode.INTERNAL


class WaitTimeout(TwolaneError, TimeoutError):
    """`wait()` gave up: the job had not finished within its timeout (it goes on)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[TwolaneError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        RateLimited,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        InternalError,
    )
}
_BY_CODE[grpc.StatusCode.UNKNOWN] = InternalError
_BY_CODE[grpc.StatusCode.DATA_LOSS] = InternalError


def error_for(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None = None,
    request_id: str = "",
) -> TwolaneError:
    """The typed error for a status, with the details its trailing metadata carries."""
    retry_after_s: float | None = None
    violations: list[FieldViolation] = []
    for key, value in trailing_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value
        elif key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            retry_after_s, violations = _details(value)
    cls = _BY_CODE.get(code, TwolaneError)
    return cls(
        message or code.name.lower().replace("_", " "),
        code=code,
        request_id=request_id,
        retry_after_s=retry_after_s,
        field_violations=tuple(violations),
    )


def from_rpc_error(err: grpc.RpcError, request_id: str = "") -> TwolaneError:
    """The typed error for a failed call (sync or asyncio)."""
    metadata: Iterable[tuple[str, str | bytes]] | None
    if isinstance(err, grpc.aio.AioRpcError):
        metadata = err.trailing_metadata()
    else:
        # What a blocking call raises is also its grpc.Call, with (key, value) pairs.
        metadata = cast(grpc.Call, err).trailing_metadata()
    return error_for(err.code(), err.details() or "", metadata, request_id)


def _details(status_bytes: bytes) -> tuple[float | None, list[FieldViolation]]:
    """RetryInfo's delay and BadRequest's violations from a google.rpc.Status."""
    retry_after_s: float | None = None
    violations: list[FieldViolation] = []
    try:
        status = status_pb2.Status.FromString(status_bytes)
    except DecodeError:  # a status we cannot read still has its code and message
        return None, []
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(retry):
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Unpack(bad_request):
            violations += [
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            ]
    return retry_after_s, violations
