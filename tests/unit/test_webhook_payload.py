"""What a delivery sends: its body, its Standard Webhooks signature (checked with the
`standardwebhooks` package), the secrets it is signed with, and the retry schedule."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from twolane.services.config import WebhookConfig, parse_schedule
from twolane.services.webhook_deliverer import retry_delay_s
from twolane.services.webhook_payload import render_body, signed_headers, webhook_id
from twolane.services.webhook_secrets import WebhookSecrets, new_secret
from twolane.v1 import generate_pb2, jobs_pb2


def event(state: int = jobs_pb2.JOB_STATE_SUCCEEDED) -> jobs_pb2.JobEvent:
    done = jobs_pb2.JobEvent(
        job_id="0123456789abcdef0123456789abcdef",
        tenant="default",
        state=state,
        custom_id="row-7",
        result=generate_pb2.GenerateResponse(text="héllo", token_ids=[1, 2, 3]),
    )
    done.finished_at.FromJsonString("2026-12-01T10:00:00.500Z")
    return done


def test_the_body_has_the_type_the_finish_time_and_the_event_with_proto_names() -> None:
    body = render_body(event())
    assert body.isascii()
    payload = json.loads(body)
    assert payload["type"] == "job.succeeded"
    assert payload["timestamp"] == "2026-12-01T10:00:00.500Z"
    assert payload["data"]["job_id"] == "0123456789abcdef0123456789abcdef"
    assert payload["data"]["custom_id"] == "row-7"
    assert payload["data"]["result"]["text"] == "héllo"
    assert payload["data"]["finished_at"] == "2026-12-01T10:00:00.500Z"


@pytest.mark.parametrize(
    ("state", "kind"),
    [
        (jobs_pb2.JOB_STATE_FAILED, "job.failed"),
        (jobs_pb2.JOB_STATE_CANCELLED, "job.cancelled"),
        (jobs_pb2.JOB_STATE_EXPIRED, "job.expired"),
    ],
)
def test_each_final_state_has_its_event_type(state: int, kind: str) -> None:
    assert json.loads(render_body(event(state)))["type"] == kind


def test_a_signed_delivery_verifies_with_standardwebhooks() -> None:
    secret = new_secret()
    body = render_body(event())
    headers = signed_headers(webhook_id("ab" * 16), body, [secret])
    assert headers["webhook-id"] == "msg_" + "ab" * 16
    assert Webhook(secret).verify(body, headers)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"row-7", b"row-8"), headers)


def test_an_attempt_is_signed_at_its_own_time_so_late_retries_still_verify() -> None:
    secret = new_secret()
    body = render_body(event())
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    old = signed_headers("msg_x", body, [secret], now=long_ago)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, old)
    assert Webhook(secret).verify(body, signed_headers("msg_x", body, [secret]))


def test_rotation_signs_with_both_secrets_until_the_grace_period_ends(tmp_path: Path) -> None:
    secrets = WebhookSecrets(tmp_path)
    first = secrets.current("default")
    assert first.startswith("whsec_")
    assert secrets.current("default") == first
    assert (tmp_path / "webhook-secrets.json").stat().st_mode & 0o777 == 0o600
    second = secrets.rotate("default", grace_s=3600)
    assert secrets.current("default") == second
    assert secrets.signing_secrets("default") == [second, first]
    body = render_body(event())
    headers = signed_headers("msg_y", body, secrets.signing_secrets("default"))
    for secret in (first, second):  # a receiver on either secret accepts it
        assert Webhook(secret).verify(body, headers)
    third = secrets.rotate("default", grace_s=0)
    assert secrets.signing_secrets("default") == [third]


def test_tenants_have_secrets_of_their_own(tmp_path: Path) -> None:
    secrets = WebhookSecrets(tmp_path)
    assert secrets.current("alpha") != secrets.current("beta")
    assert WebhookSecrets(tmp_path).current("alpha") == secrets.current("alpha")


def test_the_schedule_parses_units_and_refuses_nonsense() -> None:
    assert parse_schedule("5s,30s,2m,10m,30m,1h,3h") == (5, 30, 120, 600, 1800, 3600, 10800)
    assert parse_schedule("250ms, 1.5s, 2") == (0.25, 1.5, 2.0)
    for bad in ("", "5x", "0s", "-1s", "5s,,1m"):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    with pytest.raises(ValueError):
        WebhookConfig(retry_schedule="soon")


def test_each_retry_waits_between_half_its_step_and_its_step_so_gaps_grow() -> None:
    schedule = WebhookConfig().schedule_s
    for attempt, step_s in enumerate(schedule, start=1):
        delays = [retry_delay_s(schedule, attempt) for _ in range(200)]
        assert all(step_s / 2 <= d <= step_s for d in delays)
    for before, after in itertools.pairwise(schedule):
        assert after / 2 >= before  # so a later retry never comes sooner than an earlier
