"""`twolane serve` flags, their environment variables and the frozen ServeConfig."""

from __future__ import annotations

import dataclasses

import pytest

from twolane.services.cli import build_parser
from twolane.services.config import ServeConfig


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL", "HOST", "PORT", "LOG_JSON", "MAX_WAITING"):
        monkeypatch.delenv(f"TWOLANE_{name}", raising=False)


def parse_serve(*argv: str) -> ServeConfig:
    return ServeConfig.from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults_serve_the_builtin_model_on_localhost() -> None:
    config = parse_serve()
    assert (config.model, config.host, config.port) == ("builtin", "127.0.0.1", 50051)


def test_flags_override_defaults() -> None:
    config = parse_serve("--model", "/m", "--host", "0.0.0.0", "--port", "0", "--log-json")
    assert (config.model, config.host, config.port, config.log_json) == ("/m", "0.0.0.0", 0, True)


def test_environment_variables_stand_in_for_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOLANE_MODEL", "/models/x")
    monkeypatch.setenv("TWOLANE_PORT", "0")
    monkeypatch.setenv("TWOLANE_LOG_JSON", "1")
    monkeypatch.setenv("TWOLANE_MAX_WAITING", "3")
    config = parse_serve()
    assert (config.model, config.port, config.log_json) == ("/models/x", 0, True)
    assert config.engine_config().max_waiting_interactive == 3


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOLANE_PORT", "7000")
    assert parse_serve("--port", "7001").port == 7001


@pytest.mark.parametrize("change", [{"port": 70000}, {"grace_period_s": -1.0}, {"max_num_seqs": 0}])
def test_bad_values_are_refused_at_startup(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(ServeConfig(), **change)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServeConfig().port = 1  # type: ignore[misc]
