"""Prometheus metrics of the engine core: per lane (queue time, TTFT, TPOT, preemptions,
running and waiting), the series a vLLM operator looks for (end-to-end latency, prompt
and generation tokens, KV cache usage, prefix-cache queries and hits, with the same
meaning), and where a step's time goes. Every series carries a `model_name` label.

Each engine owns its registry, so several engines in one process (tests, benchmarks)
never collide. Served, the engine core runs in a process of its own and its metrics
reach the scrape through Prometheus' multiprocess files (see services/metrics_http.py).
"""

from __future__ import annotations

from collections.abc import Sequence as Labels
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:  # sequence.py loads torch; the job runner reads these buckets without it
    from twolane.scheduler.sequence import Sequence

LANES = ("interactive", "batch")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_PHASE_BUCKETS_S = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3)
# One engine core per process tree: with Prometheus' multiprocess mode (several
# processes, one scrape), a live gauge is the sum over the live processes.
_GAUGE_MODE: Final = "livesum"


def lane_of(seq: Sequence) -> str:
    return "batch" if seq.priority.is_batch else "interactive"


class ModelLabeled:
    """A metric whose last label is always the model's name, given once."""

    def __init__(self, metric: Any, model_name: str) -> None:
        self._metric = metric
        self._model_name = model_name

    def labels(self, *values: str) -> Any:
        return self._metric.labels(*values, self._model_name)

    def inc(self, amount: float = 1.0) -> None:
        self._metric.labels(self._model_name).inc(amount)

    def set(self, value: float) -> None:
        self._metric.labels(self._model_name).set(value)

    def observe(self, value: float) -> None:
        self._metric.labels(self._model_name).observe(value)


class EngineMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name

        def histogram(
            name: str, doc: str, labels: Labels[str], buckets: tuple[float, ...]
        ) -> ModelLabeled:
            metric = Histogram(
                name, doc, [*labels, "model_name"], buckets=buckets, registry=self.registry
            )
            return ModelLabeled(metric, model_name)

        def counter(name: str, doc: str, labels: Labels[str] = ()) -> ModelLabeled:
            metric = Counter(name, doc, [*labels, "model_name"], registry=self.registry)
            return ModelLabeled(metric, model_name)

        def gauge(name: str, doc: str, labels: Labels[str] = ()) -> ModelLabeled:
            metric = Gauge(
                name,
                doc,
                [*labels, "model_name"],
                registry=self.registry,
                multiprocess_mode=_GAUGE_MODE,
            )
            return ModelLabeled(metric, model_name)

        lane = ("lane",)
        self.queue_time_s = histogram(
            "twolane_queue_time_seconds",
            "Arrival to first scheduled step.",
            lane,
            LATENCY_BUCKETS_S,
        )
        self.ttft_s = histogram(
            "twolane_time_to_first_token_seconds",
            "Arrival to first output token.",
            lane,
            LATENCY_BUCKETS_S,
        )
        self.tpot_s = histogram(
            "twolane_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            lane,
            LATENCY_BUCKETS_S,
        )
        self.e2e_s = histogram(
            "twolane_e2e_request_latency_seconds",
            "Arrival to finish, per finished request (vLLM's e2e_request_latency_seconds).",
            lane,
            LATENCY_BUCKETS_S,
        )
        self.finished = counter(
            "twolane_requests_finished", "Finished requests.", ("lane", "reason")
        )
        self.output_tokens = counter("twolane_output_tokens", "Generated tokens.", lane)
        self.prompt_tokens = counter(
            "twolane_prompt_tokens", "Prompt tokens of finished requests (vLLM's prompt_tokens)."
        )
        self.generation_tokens = counter(
            "twolane_generation_tokens",
            "Generated tokens of finished requests, both lanes (vLLM's generation_tokens).",
        )
        self.prefix_cache_queries = counter(
            "twolane_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries).",
        )
        self.prefix_cache_hits = counter(
            "twolane_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (vLLM's prefix_cache_hits).",
        )
        self.preemptions = counter(
            "twolane_preemptions", "Sequences preempted for recompute.", lane
        )
        self.urgent_starts = counter(
            "twolane_urgent_starts",
            "Interactive requests prefilled in an urgent step of their own, not a regular step.",
        )
        self.refused = counter(
            "twolane_requests_refused",
            "Requests the engine core refused at admission, by reason.",
            ("reason",),
        )
        self.step_phase_s = histogram(
            "twolane_engine_step_phase_seconds",
            "Where a regular engine step's time goes: schedule, prepare (inputs), forward, "
            "sample, postprocess (stop checks, outputs), urgent (nested urgent steps), "
            "send (outputs to clients), commands (reading the socket) and idle (waiting "
            "for work).",
            ("phase",),
            _PHASE_BUCKETS_S,
        )
        self.running = gauge("twolane_running", "Running sequences.", lane)
        self.waiting = gauge("twolane_waiting", "Waiting sequences.", lane)
        self.free_blocks = gauge("twolane_kv_free_blocks", "Free KV blocks.")
        self.kv_usage = gauge(
            "twolane_kv_cache_usage_perc",
            "Share of KV blocks in use, 0 to 1 (vLLM's kv_cache_usage_perc).",
        )
        self._num_prefix_queries = 0
        self._num_prefix_hits = 0
        # Series exist from the start, at 0, so dashboards and alerts find them.
        for metric in (self.queue_time_s, self.ttft_s, self.tpot_s, self.e2e_s):
            for lane_name in LANES:
                metric.labels(lane_name)
        for counter_ in (self.output_tokens, self.preemptions):
            for lane_name in LANES:
                counter_.labels(lane_name)

    def observe_finished(self, seq: Sequence, now_s: float) -> None:
        lane = lane_of(seq)
        reason = seq.finish_reason.value if seq.finish_reason else "unknown"
        self.finished.labels(lane, reason).inc()
        self.output_tokens.labels(lane).inc(seq.num_output_tokens)
        self.prompt_tokens.inc(seq.num_prompt_tokens)
        self.generation_tokens.inc(seq.num_output_tokens)
        self.e2e_s.labels(lane).observe(now_s - seq.arrival_time_s)
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

    def observe_queues(
        self, running: list[Sequence], waiting: list[Sequence], free: int, total: int
    ) -> None:
        for lane in LANES:
            self.running.labels(lane).set(sum(1 for s in running if lane_of(s) == lane))
            self.waiting.labels(lane).set(sum(1 for s in waiting if lane_of(s) == lane))
        self.free_blocks.set(free)
        self.kv_usage.set((total - free) / total if total else 0.0)

    def observe_prefix_cache(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Counters from the block manager's running totals (only what is new counts)."""
        self.prefix_cache_queries.inc(num_query_tokens - self._num_prefix_queries)
        self.prefix_cache_hits.inc(num_hit_tokens - self._num_prefix_hits)
        self._num_prefix_queries, self._num_prefix_hits = num_query_tokens, num_hit_tokens
