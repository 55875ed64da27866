"""`twolane --help` and every subcommand's: each argument says what it does and its default."""

from __future__ import annotations

import argparse

import pytest

from twolane.services.cli import build_parser, main


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
