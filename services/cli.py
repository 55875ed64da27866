"""The `twolane` command. Each command module contributes `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

# Modules that add subcommands; a new command is one more entry here.
COMMAND_MODULES = (
    "twolane.services.supervisor",
    "twolane.services.generate_cli",
    "twolane.services.gateway",
    "twolane.services.job_cli",
    "twolane.services.bench_cli",
    "twolane.services.engine_core",
    "twolane.services.frontend",
    "twolane.services.http_front",
    "twolane.services.job_runner",
    "twolane.services.keys_cli",
    "twolane.services.status_cli",
    "twolane.services.webhooks_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twolane", description="LLM inference serving with an interactive and a batch lane."
    )
    parser.add_argument("--version", action="version", version=f"twolane {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def version() -> str:
    try:
        return importlib.metadata.version("twolane")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


# Commands that run as servers configure their own logging from their flags (as does
# any subcommand that sets `runs_server`, such as `twolane webhooks serve`).
SERVER_COMMANDS = frozenset(
    {"serve", "worker", "gateway", "frontend", "http", "engine-core", "jobs"}
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in SERVER_COMMANDS and not getattr(args, "runs_server", False):
        # A command run by hand says what went wrong in its own words; library chatter
        # (a retried connection, say) stays out of its output.
        from twolane.services.logging import configure_logging

        configure_logging(json=False, level="warning")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
