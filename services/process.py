"""What every long-running twolane command shares: config from flags, logging, signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import structlog

from twolane.services.logging import configure_logging

log = structlog.get_logger(__name__)


class _Log(Protocol):
    log_json: bool
    log_level: str


class ProcessConfig(Protocol):
    @property
    def log(self) -> _Log: ...


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
    configure_logging(json=config.log.log_json, level=config.log.log_level, process=name)
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


def settle_heap() -> None:
    """After startup: move everything allocated so far out of the garbage collector's view.

    Imports and startup leave hundreds of thousands of long-lived objects that every full
    collection would walk again (tens of milliseconds, during which the process serves
    nobody); frozen, a collection only looks at what serving allocates.
    """
    gc.collect()
    gc.freeze()


def signal_ready(fd: int) -> None:
    """Tell the supervisor this child is ready: one line on the pipe it passed, then close."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, b"ready\n")
        os.close(fd)


def keep_freed_memory() -> None:
    """Have glibc keep large freed buffers instead of returning them to the OS.

    Each engine step allocates and frees the same multi-megabyte activations; by
    default glibc maps them fresh every time (and trims the heap), so every step pays
    page faults again. Keeping them cut a served batch-64 decode step of the wide
    bench model from ~100 to ~80 ms. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8
    libc.mallopt(m_arena_max, 1)  # the engine thread shares the main arena
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 256 << 20)
