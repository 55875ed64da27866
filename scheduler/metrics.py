"""Prometheus metrics per lane: queue time, TTFT, TPOT, preemptions, running and waiting.

Each engine owns its registry, so several engines in one process (tests, benchmarks)
never collide. Served, the engine core runs in a process of its own and its metrics
reach the scrape through Prometheus' multiprocess files (see services/metrics_http.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from twolane.scheduler.sequence import Sequence

LANES = ("interactive", "batch")
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_PHASE_BUCKETS_S = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3)


def lane_of(seq: Sequence) -> str:
    return "batch" if seq.priority.is_batch else "interactive"


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_time_s = Histogram(
            "twolane_queue_time_seconds",
            "Arrival to first scheduled step.",
            ["lane"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft_s = Histogram(
            "twolane_time_to_first_token_seconds",
            "Arrival to first output token.",
            ["lane"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tpot_s = Histogram(
            "twolane_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            ["lane"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.finished = Counter(
            "twolane_requests_finished", "Finished requests.", ["lane", "reason"], registry=r
        )
        self.output_tokens = Counter(
            "twolane_output_tokens", "Generated tokens.", ["lane"], registry=r
        )
        self.preemptions = Counter(
            "twolane_preemptions", "Sequences preempted for recompute.", ["lane"], registry=r
        )
        self.urgent_starts = Counter(
            "twolane_urgent_starts",
            "Interactive requests prefilled in an urgent step of their own, not a regular step.",
            registry=r,
        )
        self.refused = Counter(
            "twolane_requests_refused",
            "Requests the engine core refused at admission, by reason.",
            ["reason"],
            registry=r,
        )
        self.step_phase_s = Histogram(
            "twolane_engine_step_phase_seconds",
            "Where a regular engine step's time goes: schedule, prepare (inputs), forward, "
            "sample, postprocess (stop checks, outputs), urgent (nested urgent steps), "
            "send (outputs to clients), commands (reading the socket) and idle (waiting "
            "for work).",
            ["phase"],
            buckets=_PHASE_BUCKETS_S,
            registry=r,
        )
        # One engine core per process tree: with Prometheus' multiprocess mode (several
        # processes, one scrape), a live gauge is the sum over the live processes.
        gauge_mode = "livesum"
        self.running = Gauge(
            "twolane_running",
            "Running sequences.",
            ["lane"],
            registry=r,
            multiprocess_mode=gauge_mode,
        )
        self.waiting = Gauge(
            "twolane_waiting",
            "Waiting sequences.",
            ["lane"],
            registry=r,
            multiprocess_mode=gauge_mode,
        )
        self.free_blocks = Gauge(
            "twolane_kv_free_blocks", "Free KV blocks.", registry=r, multiprocess_mode=gauge_mode
        )

    def observe_finished(self, seq: Sequence, now_s: float) -> None:
        lane = lane_of(seq)
        reason = seq.finish_reason.value if seq.finish_reason else "unknown"
        self.finished.labels(lane, reason).inc()
        self.output_tokens.labels(lane).inc(seq.num_output_tokens)
        if seq.first_scheduled_time_s is not None:
            self.queue_time_s.labels(lane).observe(seq.first_scheduled_time_s - seq.arrival_time_s)
        if seq.first_token_time_s is not None:
            self.ttft_s.labels(lane).observe(seq.first_token_time_s - seq.arrival_time_s)
            if seq.num_output_tokens > 1:
                tpot = (now_s - seq.first_token_time_s) / (seq.num_output_tokens - 1)
                self.tpot_s.labels(lane).observe(tpot)

    def observe_preempted(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.preemptions.labels(lane_of(seq)).inc()

    def observe_queues(self, running: list[Sequence], waiting: list[Sequence], free: int) -> None:
        for lane in LANES:
            self.running.labels(lane).set(sum(1 for s in running if lane_of(s) == lane))
            self.waiting.labels(lane).set(sum(1 for s in waiting if lane_of(s) == lane))
        self.free_blocks.set(free)
