"""Event-loop lag: how late a timer set for now runs, in every asyncio process.

A handler that holds the loop (a slow log render, a burst of protobuf work) delays
every other request of the process; this histogram shows it, per process role.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Histogram

PROBE_INTERVAL_S = 0.01
_LAG_BUCKETS_S = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3)

LOOP_LAG_S = Histogram(
    "twolane_event_loop_lag_seconds",
    "How late the event loop ran a timer due now, sampled every 10 ms, by process role.",
    ["process", "model_name"],
    buckets=_LAG_BUCKETS_S,
)


async def _probe(process: str, model_name: str) -> None:
    observe = LOOP_LAG_S.labels(process, model_name).observe
    while True:
        due_s = time.perf_counter() + PROBE_INTERVAL_S
        await asyncio.sleep(PROBE_INTERVAL_S)
        observe(max(0.0, time.perf_counter() - due_s))


@contextlib.contextmanager
def watch_loop_lag(process: str, model_name: str) -> Iterator[None]:
    """Measure the running loop's lag until the block ends."""
    task = asyncio.get_running_loop().create_task(
        _probe(process, model_name), name="twolane-loop-lag"
    )
    try:
        yield
    finally:
        task.cancel()
