"""Exceptions map to precise gRPC status codes; bad input never becomes INTERNAL."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from twolane.scheduler.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from twolane.services import errors
from twolane.services.status import to_status


def rich_status(status: grpc.Status) -> status_pb2.Status:
    (key, value), *_ = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


def bad_request_fields(status: grpc.Status) -> list[str]:
    bad_request = error_details_pb2.BadRequest()
    assert rich_status(status).details[0].Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]


def test_invalid_argument_carries_every_field_violation() -> None:
    exc = errors.InvalidArgumentError(
        [errors.FieldViolation("prompt", "empty"), errors.FieldViolation("params.top_k", "< 0")]
    )
    status = to_status(exc)
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(status) == ["prompt", "params.top_k"]


def test_engine_invalid_request_names_its_field() -> None:
    status = to_status(InvalidRequestError("prompt", "too long"))
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(status) == ["prompt"]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (QueueFullError("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineStoppedError("stopping"), grpc.StatusCode.UNAVAILABLE),
        (errors.NotFoundError("no job x"), grpc.StatusCode.NOT_FOUND),
        (errors.NotConfiguredError("no batch lane"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.RequestDeadlineError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.UnauthenticatedError("who"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_typed_errors_get_their_own_code(exc: Exception, code: grpc.StatusCode) -> None:
    status = to_status(exc)
    assert status.code is code
    assert status.details == str(exc)


def test_unexpected_errors_are_internal_without_their_details() -> None:
    status = to_status(KeyError("secret internal state"))
    assert status.code is grpc.StatusCode.INTERNAL
    assert "secret" not in status.details
