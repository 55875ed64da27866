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


# Server commands, and the children serve and worker start, import their own command's
# module only: every other command's imports (grpc, NATS, FastAPI) would cost each
# process a second of every start, and a restarted worker serves that much sooner.
SERVER_COMMAND_MODULES = {
    "serve": "twolane.services.supervisor",
    "worker": "twolane.services.supervisor",
    "gateway": "twolane.services.gateway",
    "engine-core": "twolane.services.engine_core",
    "frontend": "twolane.services.frontend",
    "http": "twolane.services.http_front",
    "jobs": "twolane.services.job_runner",
    "webhooks": "twolane.services.webhooks_cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or only the subparsers of `command`'s module for a server command."""
    parser = argparse.ArgumentParser(
        prog="twolane", description="LLM inference serving with an interactive and a batch lane."
    )
    parser.add_argument("--version", action="version", version=f"twolane {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    own_module = SERVER_COMMAND_MODULES.get(command or "")
    for name in (own_module,) if own_module is not None else COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def version() -> str:
    try:
        return importlib.metadata.version("twolane")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


# Commands that run as servers configure their own logging from their flags (as does
# any subcommand that sets `runs_server`: `twolane webhooks serve`, not its siblings).
SERVER_COMMANDS = frozenset(SERVER_COMMAND_MODULES) - {"webhooks"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    if args.command not in SERVER_COMMANDS and not getattr(args, "runs_server", False):
        # A command run by hand says what went wrong in its own words; library chatter
        # (a retried connection, say) stays out of its output.
        from twolane.services.logging import configure_logging

        configure_logging(json=False, level="warning")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
