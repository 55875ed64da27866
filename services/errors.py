"""Typed errors that services raise; status.py turns each into its gRPC status code.

Components outside the gateway (the batch lane's job store, auth) raise these
instead of touching gRPC, so the mapping to status codes stays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

# What an error message may quote of a client's input (an id, a value): enough to
# recognise it, never enough to outgrow the client's metadata limit (8 KiB by default).
MAX_QUOTED_CHARS = 64


def quoted(value: str, max_chars: int = MAX_QUOTED_CHARS) -> str:
    """`value` quoted for an error message; past `max_chars` cut, with its length noted."""
    if len(value) <= max_chars:
        return repr(value)
    return f"{value[:max_chars]!r}... ({len(value)} characters)"


class ServiceError(Exception):
    """Base class; `code` is the gRPC status the caller sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class FieldViolation:
    """One bad input field, named by its path in the request (`params.top_p`)."""

    field: str
    description: str


class InvalidArgumentError(ServiceError):
    """The request is malformed; `violations` name every offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        assert violations, "an InvalidArgumentError needs at least one violation"
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = tuple(violations)


class NotFoundError(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MalformedRequestError(ServiceError):
    """The request body is not a message of the method's type (truncated, not UTF-8)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RateLimitedError(ResourceExhaustedError):
    """Over a quota or a queue bound; `retry_after_s` says when trying again can work
    (sent as google.rpc.RetryInfo)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class NotConfiguredError(ServiceError):
    """The RPC needs a component this server was started without."""

    code = grpc.StatusCode.UNIMPLEMENTED


class RequestDeadlineError(ServiceError):
    """The request's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestAbortedError(ServiceError):
    """The engine aborted the request (it was cancelled or the engine is stopping)."""

    code = grpc.StatusCode.CANCELLED


class RequestFailedError(ServiceError):
    """The engine failed while running the request; not the caller's fault."""

    code = grpc.StatusCode.INTERNAL
