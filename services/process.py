"""What every long-running twolane command shares: config from flags, logging, signals."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import structlog

from twolane.services.logging import configure_logging

log = structlog.get_logger(__name__)


class ProcessConfig(Protocol):
    log_json: bool
    log_level: str


C = TypeVar("C", bound=ProcessConfig)


def run_process(
    name: str,
    args: argparse.Namespace,
    build_config: Callable[[argparse.Namespace], C],
    run: Callable[[C], Coroutine[Any, Any, None]],
) -> int:
    """Build the config (exit 2 on a bad flag), then run until stopped (exit 1 on startup
    failures such as a missing model directory or a port in use, without a traceback)."""
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"twolane {name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(json=config.log_json, level=config.log_level)
    try:
        asyncio.run(run(config))
    except (OSError, ValueError) as exc:
        log.error("startup failed", error=str(exc))
        return 1
    return 0


def stop_event() -> asyncio.Event:
    """An event that SIGTERM and SIGINT set: the signal to drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
