"""`twolane serve` flags, their environment variables and the frozen ServeConfig."""

from __future__ import annotations

import dataclasses

import pytest

from twolane.services.cli import build_parser
from twolane.services.config import ServeConfig


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL", "HOST", "PORT", "LOG_JSON", "MAX_WAITING", "THREADS"):
        monkeypatch.delenv(f"TWOLANE_{name}", raising=False)


def parse_serve(*argv: str) -> ServeConfig:
    return ServeConfig.from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults_serve_smollm2_on_localhost() -> None:
    config = parse_serve()
    assert (config.engine.model, config.listen.host, config.listen.port) == (
        "smollm2",
        "127.0.0.1",
        50051,
    )


def test_flags_override_defaults() -> None:
    config = parse_serve("--model", "/m", "--host", "0.0.0.0", "--port", "0", "--log-json")
    assert (config.engine.model, config.listen.host, config.listen.port) == ("/m", "0.0.0.0", 0)
    assert config.log.log_json


def test_environment_variables_stand_in_for_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOLANE_MODEL", "/models/x")
    monkeypatch.setenv("TWOLANE_PORT", "0")
    monkeypatch.setenv("TWOLANE_LOG_JSON", "1")
    monkeypatch.setenv("TWOLANE_MAX_WAITING", "3")
    config = parse_serve()
    assert (config.engine.model, config.listen.port, config.log.log_json) == ("/models/x", 0, True)
    assert config.engine.max_waiting_interactive == 3


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOLANE_PORT", "7000")
    assert parse_serve("--port", "7001").listen.port == 7001


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--attention-backend", "torch", "attention_backend"),
        ("--kv-cache-bytes", "1048576", "kv_cache_bytes"),
        ("--seed", "7", "seed"),
        ("--threads", "3", "threads"),
        ("--max-model-len", "512", "max_model_len"),
    ],
)
def test_every_engine_option_has_a_flag(flag: str, value: str, field: str) -> None:
    engine = parse_serve(flag, value).engine
    assert str(getattr(engine, field)) == value


def test_prefix_caching_can_be_turned_off_by_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_serve().engine.enable_prefix_caching
    assert not parse_serve("--no-enable-prefix-caching").engine.enable_prefix_caching
    monkeypatch.setenv("TWOLANE_ENABLE_PREFIX_CACHING", "0")
    assert not parse_serve().engine.enable_prefix_caching


def test_a_child_rebuilds_exactly_the_config_it_was_given() -> None:
    from twolane.services import options
    from twolane.services.config import ChildConfig, EngineCoreProcessConfig

    config = parse_serve("--model", "/m", "--max-num-seqs", "9", "--no-enable-prefix-caching")
    child = EngineCoreProcessConfig(
        engine=config.engine, log=config.log, child=ChildConfig(ipc_dir="/run/x")
    )
    argv = ["engine-core", *options.to_argv(child)]
    rebuilt = options.from_args(EngineCoreProcessConfig, build_parser().parse_args(argv))
    assert rebuilt == child


@pytest.mark.parametrize(
    ("part", "change"),
    [
        ("listen", {"port": 70000}),
        ("listen", {"grace_period_s": -1.0}),
        ("engine", {"max_num_seqs": 0}),
    ],
)
def test_bad_values_are_refused_at_startup(part: str, change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(getattr(ServeConfig(), part), **change)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServeConfig().metrics_port = 1  # type: ignore[misc]
