"""Exceptions as OpenAI-style HTTP errors: a status, the `{"error": {...}}` body, headers.

Which kind of failure an exception is stays decided in one place, services/status.py
(the gRPC status it maps to); this module only says what that status is over HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.rpc import error_details_pb2, status_pb2

from twolane.scheduler.errors import InvalidRequestError
from twolane.services.errors import InvalidArgumentError, NotFoundError, ServiceError
from twolane.services.openai_format import error_body
from twolane.services.openai_schema import openai_field
from twolane.services.status import STATUS_DETAILS_KEY, to_status

log = structlog.get_logger(__name__)

# When the error does not say (an engine that is down): seconds before trying again.
RETRY_AFTER_S = 1

# gRPC status -> (HTTP status, OpenAI error type, code)
_HTTP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "invalid_request_error", None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
_INTERNAL = (500, "server_error", None)


class ModelNotFoundError(NotFoundError):
    """The request names a model this server does not serve."""


@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def http_error(exc: Exception) -> HttpError:
    """The response for `exc`; an unexpected one is logged here and answered tersely."""
    status = to_status(exc)
    status_code, error_type, code = _HTTP.get(status.code, _INTERNAL)
    if isinstance(exc, ModelNotFoundError):
        code = "model_not_found"
    if status_code == 500 and not isinstance(exc, ServiceError):
        log.error("unhandled error", exc_info=exc)
    message = status.details
    if isinstance(exc, InvalidArgumentError):
        message = "; ".join(f"{openai_field(v.field)}: {v.description}" for v in exc.violations)
    body = error_body(message, error_type, param_of(exc), code)
    headers = {}
    if status_code in (429, 503):
        headers["Retry-After"] = str(retry_after_s(status) or RETRY_AFTER_S)
    return HttpError(status_code, body, headers)


def retry_after_s(status: grpc.Status) -> int | None:
    """Whole seconds from the status's google.rpc.RetryInfo (a quota's or a full queue's
    wait, the same that gRPC callers get), rounded up; None if it has none."""
    for key, value in status.trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return max(1, math.ceil(info.retry_delay.ToNanoseconds() / 1e9))
    return None


def param_of(exc: Exception) -> str | None:
    """The first bad field of `exc`, by its OpenAI name."""
    if isinstance(exc, InvalidArgumentError):
        return openai_field(exc.violations[0].field)
    if isinstance(exc, InvalidRequestError):
        return openai_field(exc.field)
    return None
