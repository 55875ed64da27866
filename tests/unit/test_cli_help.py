"""`twolane --help` and every subcommand's: each argument says what it does and its default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from twolane.services.cli import SERVER_COMMAND_MODULES, build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_argument_of_every_subcommand_has_a_description_and_shows_its_default(
    name: str,
) -> None:
    parser = subcommands()[name]
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help, f"twolane {name}: {label} has no description"
    text = parser.format_help()
    if any(a.option_strings and a.default is not None for a in parser._actions[1:]):
        assert "(default:" in text


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("twolane 0.")


@pytest.mark.parametrize("name", ["gateway", "worker"])
def test_gateway_and_worker_help_claim_no_embedded_nats_server(name: str) -> None:
    text = subcommands()[name].format_help()
    assert "embedded" not in text
    # A worker keeps a data dir of its own (identity, secrets); a gateway has none.
    assert ("--data-dir" in text) == (name == "worker")
    options = text.split("options:", 1)[1]
    assert "required" in options.split("--nats-url", 1)[1][:200]


@pytest.mark.parametrize("name", sorted(SERVER_COMMAND_MODULES))
def test_a_server_command_parses_alone_as_in_the_whole_cli(name: str) -> None:
    """A server imports only its command's module: that parser must be the whole CLI's."""
    (alone,) = [a for a in build_parser(name)._actions if isinstance(a, argparse._SubParsersAction)]
    assert name in alone.choices
    assert alone.choices[name].format_help() == subcommands()[name].format_help()


def test_every_command_the_supervisor_starts_parses_alone() -> None:
    from twolane.services.config import ServeConfig
    from twolane.services.supervisor import Supervisor

    supervisor = Supervisor(
        ServeConfig(), "nats://127.0.0.1:4222", "", Path("/tmp"), 0, Path("/tmp"), http_port=0
    )
    assert {child.role for child in supervisor.plan()} <= set(SERVER_COMMAND_MODULES)
