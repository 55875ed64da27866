"""Batch-lane flags and environment variables, and how `twolane batch` reads its input."""

from __future__ import annotations

import json

import pytest

from twolane.services import options
from twolane.services.batch_lines import BadLine, GoodLine, parse_lines
from twolane.services.cli import build_parser
from twolane.services.config import JobsConfig, ServeConfig
from twolane.services.gateway import GatewayConfig
from twolane.services.job_cli import idempotency_key


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NATS_URL", "DATA_DIR", "JOB_MAX_DELIVER", "FAULT_FAIL_PROMPT_PREFIX"):
        monkeypatch.delenv(f"TWOLANE_{name}", raising=False)


def test_serve_starts_an_embedded_nats_server_unless_given_a_url() -> None:
    config = ServeConfig.from_args(build_parser().parse_args(["serve"]))
    assert config.jobs.nats_url == ""
    assert config.jobs.fail_prompt_prefix == ""
    config = ServeConfig.from_args(
        build_parser().parse_args(["serve", "--nats-url", "nats://n:4222", "--data-dir", "/d"])
    )
    assert (config.jobs.nats_url, config.jobs.data_dir) == ("nats://n:4222", "/d")


def test_job_settings_come_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOLANE_JOB_MAX_DELIVER", "7")
    monkeypatch.setenv("TWOLANE_FAULT_FAIL_PROMPT_PREFIX", "boom")
    args = build_parser().parse_args(["serve", "--job-ack-wait-s", "4.5"])
    jobs = ServeConfig.from_args(args).jobs
    assert (jobs.max_deliver, jobs.ack_wait_s, jobs.fail_prompt_prefix) == (7, 4.5, "boom")


@pytest.mark.parametrize(
    "change", [{"max_deliver": 0}, {"ack_wait_s": 0.1}, {"max_queued_jobs": -1}]
)
def test_bad_job_settings_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        JobsConfig(**change)  # type: ignore[arg-type]


def test_the_gateway_needs_a_nats_url_and_takes_repeated_workers() -> None:
    with pytest.raises(ValueError, match="--nats-url"):
        options.from_args(GatewayConfig, build_parser().parse_args(["gateway"]))
    args = ["gateway", "--nats-url", "nats://n:1", "--worker", "a:1", "--worker", "b:2"]
    assert options.from_args(GatewayConfig, build_parser().parse_args(args)).workers == (
        "a:1",
        "b:2",
    )


def test_batch_reads_openai_batch_lines_and_flat_lines() -> None:
    lines = [
        json.dumps(
            {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": "hi", "max_tokens": 3, "stop": "\n", "seed": 5},
            }
        ),
        "",
        json.dumps({"custom_id": "b", "prompt": "yo"}),
        json.dumps({"custom_id": "c", "body": {"messages": [{"role": "user", "content": "hey"}]}}),
    ]
    parsed = parse_lines("\n".join(lines), default_max_tokens=9, flat=True)
    assert all(isinstance(line, GoodLine) for line in parsed)
    first, second, chat = parsed
    assert [line.number for line in parsed] == [1, 3, 4]
    assert (first.request.prompt, first.request.params.max_tokens) == ("hi", 3)
    assert (list(first.request.params.stop), first.request.params.seed) == (["\n"], 5)
    assert (second.custom_id, second.request.params.max_tokens) == ("b", 9)
    assert chat.endpoint == "/v1/chat/completions"
    assert [(m.role, m.content) for m in chat.request.messages] == [("user", "hey")]


@pytest.mark.parametrize(
    ("line", "custom_id", "message"),
    [
        ("not json", None, "line: not JSON"),
        (json.dumps({"body": {"prompt": "x"}}), None, "custom_id: required"),
        (
            json.dumps({"custom_id": "a", "body": {"prompt": "x", "max_token": 3}}),
            "a",
            "body.max_token",
        ),
        (
            json.dumps({"custom_id": "a", "body": {"prompt": "x", "top_k": "many"}}),
            "a",
            "body.top_k",
        ),
        (json.dumps({"custom_id": "a", "body": {"prompt": "x", "n": 2}}), "a", "body.n"),
        (json.dumps({"custom_id": "a", "url": "/v1/embeddings", "body": {}}), "a", "url"),
    ],
)
def test_a_bad_line_is_named_by_number_custom_id_and_field(
    line: str, custom_id: str | None, message: str
) -> None:
    good = json.dumps({"custom_id": "ok", "body": {"prompt": "fine"}})
    first, bad = parse_lines(good + "\n" + line)
    assert isinstance(first, GoodLine) and isinstance(bad, BadLine)
    assert (bad.number, bad.custom_id) == (2, custom_id)
    assert bad.describe().startswith("line 2")
    assert message in bad.message


def test_batch_refuses_a_repeated_custom_id() -> None:
    line = json.dumps({"custom_id": "a", "body": {"prompt": "x"}})
    first, second = parse_lines(line + "\n" + line)
    assert isinstance(first, GoodLine) and isinstance(second, BadLine)
    assert "repeats the one on line 1" in second.message


def test_the_batch_idempotency_key_covers_the_model_and_every_parameter() -> None:
    (line,) = parse_lines(json.dumps({"custom_id": "a", "body": {"prompt": "x"}}))
    (longer,) = parse_lines(
        json.dumps({"custom_id": "a", "body": {"prompt": "x", "max_tokens": 17}})
    )
    assert isinstance(line, GoodLine) and isinstance(longer, GoodLine)
    key = idempotency_key("builtin", "bulk", line)
    assert key == idempotency_key("builtin", "bulk", line)
    assert key != idempotency_key("smollm2", "bulk", line)
    assert key != idempotency_key("builtin", "urgent", line)
    assert key != idempotency_key("builtin", "bulk", longer)
