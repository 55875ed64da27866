"""Prometheus metrics of a gateway: its workers, where calls went, and how well the
cache-aware routing guessed (predicted against reported cached prompt tokens)."""

from __future__ import annotations

import contextlib
from collections import Counter as Tally

from prometheus_client import Counter, Gauge

from twolane.services.membership import DRAINING, SERVING, STARTING, WorkerRecord
from twolane.v1 import generate_pb2

WORKERS = Gauge("twolane_gateway_workers", "Workers this gateway knows, by state.", ["state"])
REQUESTS = Counter(
    "twolane_gateway_requests",
    "Interactive calls forwarded, by the worker that answered.",
    ["worker"],
)
# Every series is per worker, so none has a sample before the gateway uses it: every
# process imports this module (through the CLI), and the merged scrape of a `twolane serve`
# must not carry a gateway's series without the model_name its own all have.
FAILOVERS = Counter(
    "twolane_gateway_failovers",
    "Calls moved on to another worker, by the worker that answered UNAVAILABLE.",
    ["worker"],
)
PROMPT_TOKENS = Counter(
    "twolane_gateway_prompt_tokens",
    "Prompt tokens of the calls forwarded (as the workers count), by worker.",
    ["worker"],
)
CACHED_TOKENS = Counter(
    "twolane_gateway_cached_tokens",
    "Prompt tokens the workers served from their prefix cache (their usage.cached_tokens).",
    ["worker"],
)
CACHE_INDEX_BLOCKS = Gauge(
    "twolane_gateway_cache_index_blocks",
    "Prefix-cache blocks this gateway believes a worker holds (from its cache events).",
    ["worker"],
)
PREDICTED_CACHED_TOKENS = Counter(
    "twolane_gateway_predicted_cached_tokens",
    "Prompt tokens routing expected the chosen worker to hold in its prefix cache.",
    ["worker"],
)


def know_worker(worker: str) -> None:
    """Start a worker's series at zero, so a scrape shows them before its first call."""
    for counter in (REQUESTS, FAILOVERS, PROMPT_TOKENS, CACHED_TOKENS, PREDICTED_CACHED_TOKENS):
        counter.labels(worker)


def count_workers(records: list[WorkerRecord | None]) -> None:
    """Set the workers gauge; None stands for a static --worker (counted as serving)."""
    by_state = Tally(record.state if record is not None else SERVING for record in records)
    for state in (STARTING, SERVING, DRAINING):
        WORKERS.labels(state).set(by_state.get(state, 0))


def count_cached_blocks(worker: str, num_blocks: int | None) -> None:
    """Set a worker's index size; None: the worker is gone."""
    if num_blocks is not None:
        CACHE_INDEX_BLOCKS.labels(worker).set(num_blocks)
        return
    with contextlib.suppress(KeyError):
        CACHE_INDEX_BLOCKS.remove(worker)


def observe_answer(worker: str, usage: generate_pb2.Usage, num_predicted_cached: int) -> None:
    REQUESTS.labels(worker).inc()
    PROMPT_TOKENS.labels(worker).inc(usage.prompt_tokens)
    CACHED_TOKENS.labels(worker).inc(usage.cached_tokens)
    PREDICTED_CACHED_TOKENS.labels(worker).inc(num_predicted_cached)
