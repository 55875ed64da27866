"""Prometheus metrics of the webhook service.

Under `twolane serve` the service is a child process and its metrics reach the scrape
through Prometheus' multiprocess files (see metrics_http.py). The gauges read shared
state (the circuit of a host, the DLQ's depth), so across processes the scrape shows
their largest value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from twolane.services.webhook_hosts import CircuitState

_ATTEMPT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ATTEMPT_RESULTS = ("2xx", "http_error", "timeout", "connect_error", "refused", "paused")


class WebhookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.deliveries = Counter(
            "twolane_webhook_deliveries",
            "Webhook deliveries that ended, by outcome: delivered (2xx) or failed (retry "
            "schedule used up, or 410 Gone; on twolane.dlq.webhooks).",
            ["outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "twolane_webhook_attempts",
            "Webhook attempts by result: 2xx, http_error (any other status), timeout, "
            "connect_error, refused (address refused at connect time), paused (host's "
            "circuit open: not sent).",
            ["result"],
            registry=r,
        )
        self.attempt_s = Histogram(
            "twolane_webhook_attempt_seconds",
            "Time from sending a webhook request to its response or its failure.",
            buckets=_ATTEMPT_BUCKETS_S,
            registry=r,
        )
        self.circuit = Gauge(
            "twolane_webhook_circuit_state",
            "Circuit breaker of a receiving host (scheme://host:port): 0 closed, "
            "1 half-open, 2 open (paused).",
            ["host"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.dlq_depth = Gauge(
            "twolane_webhook_dlq_depth",
            "Failed webhook deliveries waiting on twolane.dlq.webhooks.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.backlog = Gauge(
            "twolane_webhook_backlog",
            "Webhook deliveries not finished yet (tickets on TWOLANE_WEBHOOKS).",
            registry=r,
            multiprocess_mode="livemax",
        )

    def observe_circuit(self, origin: str, state: CircuitState) -> None:
        self.circuit.labels(origin).set(int(state))
