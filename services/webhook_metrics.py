"""Prometheus metrics of the webhook service: deliveries by outcome, attempts by result
and their latency, each host's circuit, the dead letters and the backlog.

Like the job runner's (job_metrics.py), every series carries `model_name` and exists
from the start at 0, so dashboards and alerts find them before the first delivery. Under
`twolane serve` the service is a child process and its metrics reach the scrape through
Prometheus' multiprocess files (see metrics_http.py). The dead letters and the backlog
come from JetStream itself (stream info, polled every `POLL_INTERVAL_S`), so one
process's poll speaks for every webhook process; a circuit is one process's view of a
host, and the scrape shows the worst.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import structlog
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram

from twolane.services import jetstream
from twolane.services.webhook_hosts import CircuitState

log = structlog.get_logger(__name__)

POLL_INTERVAL_S = 2.0
_ATTEMPT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ATTEMPT_RESULTS = ("2xx", "http_error", "timeout", "connect_error", "refused", "paused")
OUTCOMES = ("delivered", "failed")
_MODE: Final = "mostrecent"  # one webhook process's poll speaks for the whole stream

DELIVERIES = Counter(
    "twolane_webhook_deliveries",
    "Webhook deliveries that ended, by outcome: delivered (2xx) or failed (retry schedule "
    "used up, or 410 Gone; on twolane.dlq.webhooks).",
    ["outcome", "model_name"],
)
ATTEMPTS = Counter(
    "twolane_webhook_attempts",
    "Webhook attempts by result: 2xx, http_error (any other status), timeout, "
    "connect_error, refused (address refused at connect time), paused (host's circuit "
    "open: not sent).",
    ["result", "model_name"],
)
ATTEMPT_S = Histogram(
    "twolane_webhook_attempt_seconds",
    "Time from sending a webhook request to its response or its failure.",
    ["model_name"],
    buckets=_ATTEMPT_BUCKETS_S,
)
CIRCUIT = Gauge(
    "twolane_webhook_circuit_state",
    "Circuit breaker of a receiving host (scheme://host:port): 0 closed, 1 half-open, "
    "2 open (paused).",
    ["host", "model_name"],
    multiprocess_mode="livemax",
)
DLQ_DEPTH = Gauge(
    "twolane_webhook_dlq_depth",
    "Failed webhook deliveries waiting on twolane.dlq.webhooks.",
    ["model_name"],
    multiprocess_mode=_MODE,
)
BACKLOG = Gauge(
    "twolane_webhook_backlog",
    "Webhook deliveries not finished yet (tickets on TWOLANE_WEBHOOKS).",
    ["model_name"],
    multiprocess_mode=_MODE,
)


class WebhookMetrics:
    """Counts attempts and deliveries; with `start`, polls the dead letters and backlog."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self._task: asyncio.Task[None] | None = None
        for outcome in OUTCOMES:
            DELIVERIES.labels(outcome, model_name)
        for result in ATTEMPT_RESULTS:
            ATTEMPTS.labels(result, model_name)
        ATTEMPT_S.labels(model_name)
        DLQ_DEPTH.labels(model_name)
        BACKLOG.labels(model_name)

    def start(self, js: JetStreamContext) -> None:
        self._task = asyncio.ensure_future(self._poll_loop(js))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def attempted(self, result: str, sent_s: float | None) -> None:
        """An attempt's result; `sent_s` is how long its request took (None: not sent)."""
        ATTEMPTS.labels(result, self.model_name).inc()
        if sent_s is not None:
            ATTEMPT_S.labels(self.model_name).observe(sent_s)

    def ended(self, outcome: str) -> None:
        DELIVERIES.labels(outcome, self.model_name).inc()

    def observe_circuit(self, origin: str, state: CircuitState) -> None:
        CIRCUIT.labels(origin, self.model_name).set(int(state))

    async def _poll_loop(self, js: JetStreamContext) -> None:
        while True:
            try:
                await self._poll(js)
            except Exception as exc:  # NATS away: the gauges keep their last values
                log.debug("webhook metrics poll failed", error=repr(exc))
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _poll(self, js: JetStreamContext) -> None:
        counts = await jetstream.dead_letter_counts(js)
        DLQ_DEPTH.labels(self.model_name).set(counts.webhooks)
        tickets = await js.stream_info(jetstream.WEBHOOKS_STREAM)
        BACKLOG.labels(self.model_name).set(tickets.state.messages)
