"""`twolane bench`: twolane against transformers baselines (see twolane.bench.run)."""

from __future__ import annotations

import argparse
import shlex
import sys


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the module docstring kept as written."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from twolane.bench import run

    parser = subparsers.add_parser(
        "bench",
        help="benchmark twolane against transformers baselines",
        description=(run.__doc__ or "").strip(),
        formatter_class=_Formatter,
    )
    run.add_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from twolane.bench import run

    args.command_line = "twolane " + shlex.join(sys.argv[1:])
    return run.main(args)
