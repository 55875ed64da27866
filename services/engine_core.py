"""`twolane engine-core`: the engine core process (`scheduler.core_process`) as a command.

`twolane serve` starts it; it can also run by hand beside frontends started with the
same `--ipc-dir`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from twolane.services import options
from twolane.services.config import EngineCoreProcessConfig
from twolane.services.logging import configure_logging
from twolane.services.process import keep_freed_memory, settle_heap, signal_ready

log = structlog.get_logger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "engine-core",
        help="(started by serve) the scheduler, KV cache and model in a process of their own",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    options.add_options(parser, EngineCoreProcessConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        config = options.from_args(EngineCoreProcessConfig, args)
    except ValueError as exc:
        print(f"twolane engine-core: {exc}", file=sys.stderr)
        return 2
    configure_logging(json=config.log.log_json, level=config.log.log_level, process="engine-core")
    # Loading torch and the model happens here, in the one process that needs them.
    from twolane.scheduler.core_process import run_engine_core
    from twolane.scheduler.protocol import EngineAddress

    keep_freed_memory()
    log.info("loading model", model=config.engine.model, dtype=config.engine.dtype)
    ready = False

    def on_ready() -> None:
        nonlocal ready
        ready = True
        settle_heap()
        signal_ready(config.child.ready_fd)

    try:
        run_engine_core(config.engine, EngineAddress(Path(config.child.ipc_dir)), on_ready)
    except Exception as exc:
        if not ready and isinstance(exc, (OSError, ValueError)):
            log.error("startup failed", error=str(exc))  # a bad model path, a bad config
        else:
            log.exception("engine core failed")
        return 1
    return 0
