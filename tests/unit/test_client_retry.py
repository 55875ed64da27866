"""The client's retry rules, configuration and error mapping, without a server."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from twolane.client import (
    ClientConfig,
    InvalidArgument,
    NotFound,
    RateLimited,
    RetryPolicy,
    TwolaneError,
    Unavailable,
)
from twolane.client.config import TENANT_USER_PREFIX
from twolane.client.errors import error_for
from twolane.client.events import RESULTS_STREAM, result_subject
from twolane.client.requests import FINAL_STATES, TIERS
from twolane.client.retry import Retrier, RetryEvent
from twolane.services import jetstream, job_store, nats_auth
from twolane.services.config import DEFAULT_PORT
from twolane.services.errors import FieldViolation, InvalidArgumentError, RateLimitedError
from twolane.services.job_cli import TIERS as CLI_TIERS
from twolane.services.status import to_status

POLICY = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=1.0)


def unavailable() -> Unavailable:
    return Unavailable("connection refused")


def test_the_wait_before_each_retry_is_drawn_from_zero_to_a_capped_exponential() -> None:
    policy = RetryPolicy(
        max_attempts=12, initial_backoff_s=0.1, max_backoff_s=5.0, budget_max_tokens=1e6
    )
    retrier = Retrier(policy, rng=random.Random(7))
    for attempt in range(1, 12):
        cap_s = min(5.0, 0.1 * 2 ** (attempt - 1))
        delays = [retrier.delay_s("M", attempt, unavailable(), None) for _ in range(200)]
        drawn = [d for d in delays if d is not None]
        assert len(drawn) == 200 and all(0 <= d <= cap_s for d in drawn)
        # Full jitter: the draws spread over the whole range, not around the cap.
        assert min(drawn) < 0.1 * cap_s and max(drawn) > 0.9 * cap_s


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("bad"),
        NotFound("no such job"),
        TwolaneError("internal", code=grpc.StatusCode.INTERNAL),
        TwolaneError("late", code=grpc.StatusCode.DEADLINE_EXCEEDED),
        TwolaneError("key", code=grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_only_unavailable_and_resource_exhausted_are_retried(error: TwolaneError) -> None:
    retrier = Retrier(POLICY)
    assert retrier.delay_s("M", 1, error, None) is None
    assert retrier.delay_s("M", 1, unavailable(), None) is not None
    assert retrier.delay_s("M", 1, RateLimited("quota"), None) is not None


def test_no_more_attempts_than_the_policy_allows() -> None:
    retrier = Retrier(RetryPolicy(max_attempts=3))
    assert retrier.delay_s("M", 2, unavailable(), None) is not None
    assert retrier.delay_s("M", 3, unavailable(), None) is None


def test_a_retry_info_delay_is_waited_for_in_full_and_the_jitter_comes_on_top() -> None:
    events: list[RetryEvent] = []
    retrier = Retrier(POLICY, on_retry=events.append, rng=random.Random(1))
    delay_s = retrier.delay_s("Generate", 1, RateLimited("over quota", retry_after_s=2.5), None)
    assert delay_s is not None and 2.5 <= delay_s <= 2.5 + POLICY.initial_backoff_s
    assert [(e.method, e.attempt, e.delay_s) for e in events] == [("Generate", 1, delay_s)]


def test_a_retry_that_would_land_past_the_deadline_is_not_made() -> None:
    retrier = Retrier(POLICY)
    assert retrier.delay_s("M", 1, RateLimited("quota", retry_after_s=5.0), 4.0) is None
    assert retrier.delay_s("M", 1, RateLimited("quota", retry_after_s=1.0), 4.0) is not None


def test_the_budget_stops_retries_after_half_its_tokens_and_successes_earn_them_back() -> None:
    retrier = Retrier(RetryPolicy(budget_max_tokens=10, budget_token_ratio=0.5))
    allowed = [retrier.delay_s("M", 1, unavailable(), None) is not None for _ in range(8)]
    # 10 tokens, one lost per failure, retries while more than 5 are left.
    assert allowed == [True] * 4 + [False] * 4
    assert retrier.stats.num_retries_throttled == 4
    for _ in range(20):
        retrier.succeeded()
    assert retrier.budget.tokens == 10
    assert retrier.delay_s("M", 1, unavailable(), None) is not None


def test_retry_info_and_field_violations_are_read_from_a_real_status() -> None:
    limited = to_status(RateLimitedError("slow down", retry_after_s=1.5))
    error = error_for(limited.code, limited.details, limited.trailing_metadata, "rid-1")
    assert isinstance(error, RateLimited)
    assert error.retry_after_s == pytest.approx(1.5)
    assert error.request_id == "rid-1"

    invalid = to_status(InvalidArgumentError([FieldViolation("params.top_p", "must be in (0, 1]")]))
    error = error_for(invalid.code, invalid.details, invalid.trailing_metadata)
    assert isinstance(error, InvalidArgument)
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("params.top_p", "must be in (0, 1]")
    ]


def test_a_status_that_cannot_be_read_keeps_its_code_and_message() -> None:
    error = error_for(
        grpc.StatusCode.UNAVAILABLE, "gone", (("grpc-status-details-bin", b"\xff\x00junk"),)
    )
    assert isinstance(error, Unavailable) and error.message == "gone"


def test_the_request_id_in_the_trailing_metadata_wins() -> None:
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="no such job")
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo())
    status.details.append(packed)
    error = error_for(
        grpc.StatusCode.NOT_FOUND,
        "no such job",
        (("x-request-id", "server-side"), ("grpc-status-details-bin", status.SerializeToString())),
        "sent",
    )
    assert isinstance(error, NotFound) and error.request_id == "server-side"
    assert "server-side" in str(error)


def test_the_config_reads_the_cli_environment_variables(tmp_path: Path) -> None:
    creds = tmp_path / "tenant.creds"
    creds.write_text(f"{nats_auth.tenant_user('alpha')}\nsecret\n")
    config = ClientConfig.from_env(
        {
            "TWOLANE_TARGET": "a:1, b:2",
            "TWOLANE_API_KEY": "tl_key",
            "TWOLANE_NATS_CREDS": str(creds),
            "TWOLANE_DEADLINE_S": "5",
        },
        tls_ca="ca.pem",
    )
    assert config.targets == ("a:1", "b:2")
    assert config.call_metadata() == (("authorization", "Bearer tl_key"),)
    assert config.deadline_s == 5.0 and config.tls_ca == "ca.pem"
    # The tenant comes from the NATS user that `twolane nats-creds` names.
    assert config.resolved_tenant() == "alpha"
    assert config.nats_user() == nats_auth.read_credentials(creds)
    assert ClientConfig.from_env({}).resolved_tenant() == jetstream.DEFAULT_TENANT


def test_the_nats_url_comes_from_the_data_dir_that_serve_wrote(tmp_path: Path) -> None:
    (tmp_path / "nats.url").write_text("nats://127.0.0.1:4999\n")
    assert ClientConfig(data_dir=str(tmp_path)).resolved_nats_url() == "nats://127.0.0.1:4999"
    assert ClientConfig(data_dir=str(tmp_path / "none")).resolved_nats_url() == ""
    assert ClientConfig(nats_url="nats://x:1", data_dir=str(tmp_path)).resolved_nats_url() == (
        "nats://x:1"
    )


def test_the_clients_copies_of_server_names_agree_with_the_server() -> None:
    assert result_subject("t", "j") == jetstream.result_subject("t", "j")
    assert RESULTS_STREAM == jetstream.RESULTS_STREAM
    assert nats_auth.tenant_user("t") == f"{TENANT_USER_PREFIX}t"
    assert ClientConfig().targets == (f"127.0.0.1:{DEFAULT_PORT}",)
    assert FINAL_STATES == job_store.TERMINAL_STATES
    assert TIERS == CLI_TIERS


@pytest.mark.parametrize(
    "changes",
    [
        {"targets": ()},
        {"deadline_s": 0.0},
        {"tls_key": "key.pem"},
        {"poll_initial_s": 3.0, "poll_max_s": 2.0},
    ],
)
def test_a_bad_config_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ClientConfig(**changes)  # type: ignore[arg-type]


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)
