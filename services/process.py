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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import structlog

from twolane.services.logging import configure_logging
from twolane.services.tracing import setup_tracing, shutdown_tracing

log = structlog.get_logger(__name__)


class _Log(Protocol):
    # Read-only: the configs are frozen dataclasses.
    @property
    def log_json(self) -> bool: ...
    @property
    def log_level(self) -> str: ...


class ProcessConfig(Protocol):
    @property
    def log(self) -> _Log: ...


C = TypeVar("C", bound=ProcessConfig)
T = TypeVar("T")


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
    setup_tracing(name)
    try:
        asyncio.run(run(config))
    except StopBeforeReady:
        log.info("stopped before it was ready")
    except (OSError, ValueError) as exc:
        log.error("startup failed", error=str(exc))
        return 1
    finally:
        shutdown_tracing()
    return 0


class StopBeforeReady(Exception):
    """SIGTERM or SIGINT came while the process was still starting."""


CANCEL_GRACE_S = 1.0


async def unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T:
    """`awaitable`'s result, or StopBeforeReady as soon as `stop` is set: a process
    waiting on something that does not answer still stops when told to."""
    work = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if work.done():
        return work.result()
    work.cancel()
    # Bounded: a client library caught mid-handshake may not end at once when cancelled
    # (nats-py waiting for a silent server's INFO did not), and stopping must not wait on it.
    await asyncio.wait({work}, timeout=CANCEL_GRACE_S)
    if work.done() and not work.cancelled():
        work.exception()  # retrieved, so it is not reported as never retrieved
    raise StopBeforeReady


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
