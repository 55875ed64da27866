"""Batch-lane flags and environment variables, and how `twolane batch` reads its input."""

from __future__ import annotations

import json

import pytest

from twolane.services import options
from twolane.services.cli import build_parser
from twolane.services.config import JobsConfig, ServeConfig
from twolane.services.gateway import GatewayConfig
from twolane.services.job_cli import BatchInputError, parse_batch
from twolane.v1 import jobs_pb2


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
    ]
    parsed = list(parse_batch(lines, jobs_pb2.JOB_TIER_BULK, default_max_tokens=9))
    assert [custom_id for custom_id, _ in parsed] == ["a", "b"]
    first, second = (request for _, request in parsed)
    assert (first.request.prompt, first.request.params.max_tokens) == ("hi", 3)
    assert (list(first.request.params.stop), first.request.params.seed) == (["\n"], 5)
    assert (second.request.params.max_tokens, second.tier) == (9, jobs_pb2.JOB_TIER_BULK)
    assert second.custom_id == "b"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        (json.dumps({"body": {"prompt": "x"}}), "custom_id is missing"),
        (json.dumps({"custom_id": "a", "body": {"prompt": ""}}), "body.prompt"),
    ],
)
def test_batch_names_the_bad_line(line: str, message: str) -> None:
    with pytest.raises(BatchInputError, match=f"line 1: .*{message}"):
        list(parse_batch([line], jobs_pb2.JOB_TIER_BULK, 8))


def test_batch_refuses_a_repeated_custom_id() -> None:
    line = json.dumps({"custom_id": "a", "prompt": "x"})
    with pytest.raises(BatchInputError, match="repeated"):
        list(parse_batch([line, line], jobs_pb2.JOB_TIER_BULK, 8))
