"""The deployment example is valid: nats-server accepts its configs, twolane its flags."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from twolane.services.cli import build_parser
from twolane.services.nats_embedded import nats_server_binary

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "cluster"
CONFIGS = sorted(CLUSTER.glob("nats-*.conf"))


def procfile_commands() -> dict[str, list[str]]:
    commands = {}
    for line in (CLUSTER / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            commands[name] = shlex.split(command)
    return commands


def test_the_example_has_three_nats_servers_two_workers_and_two_gateways() -> None:
    programs = [
        argv[:2] if argv[0] == "twolane" else argv[:1] for argv in procfile_commands().values()
    ]
    assert programs.count(["nats-server"]) == 3 == len(CONFIGS)
    assert programs.count(["twolane", "worker"]) == 2
    assert programs.count(["twolane", "gateway"]) == 2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_nats_server_accepts_each_config(config: Path) -> None:
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_every_twolane_command_of_the_procfile_parses() -> None:
    parser = build_parser()
    for name, argv in procfile_commands().items():
        if argv[0] == "twolane":
            args = parser.parse_args(argv[1:])
            assert args.command in ("worker", "gateway"), name
            assert "," in args.nats_url  # every server of the cluster, not one
            assert args.nats_replicas == 3, name  # streams and buckets on every node
