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


def test_an_error_quoting_a_huge_id_stays_small_enough_for_metadata() -> None:
    status = to_status(errors.NotFoundError(f"no job with id {errors.quoted('j' * 10_000)}"))
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert len(status.details) < 200
    assert sum(len(v) for _, v in status.trailing_metadata) < 1000


def test_any_message_and_violation_list_is_bounded() -> None:
    violations = [errors.FieldViolation(f"f{i}", "x" * 5000) for i in range(100)]
    status = to_status(errors.InvalidArgumentError(violations))
    assert len(status.details) < 2000
    assert sum(len(v) for _, v in status.trailing_metadata) < 8192


def test_resource_exhausted_carries_a_retry_delay() -> None:
    for exc, delay_s in [
        (QueueFullError("busy"), 0.5),
        (errors.RateLimitedError("over the quota", retry_after_s=2.5), 2.5),
    ]:
        retry_info = error_details_pb2.RetryInfo()
        details = rich_status(to_status(exc)).details
        assert any(d.Unpack(retry_info) for d in details)
        assert retry_info.retry_delay.ToTimedelta().total_seconds() == delay_s
