"""Batch-lane metrics of the job runner: backlog and lag per tier, dead letters, jobs by
final state, their time queued and running, and the age of the oldest queued job.

The backlog figures come from JetStream itself (consumer and stream info, polled every
`POLL_INTERVAL_S`), so they count every worker's jobs, not only this one's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Final

import structlog
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram

from twolane.scheduler.metrics import LATENCY_BUCKETS_S
from twolane.services import jetstream
from twolane.services.job_store import JobStore, parse_ticket
from twolane.v1 import jobs_pb2

log = structlog.get_logger(__name__)

POLL_INTERVAL_S = 2.0
_JOB_BUCKETS_S = (*LATENCY_BUCKETS_S, 900, 3600, 4 * 3600, 24 * 3600)
_MODE: Final = "mostrecent"  # one job runner's poll speaks for the whole stream

PENDING = Gauge(
    "twolane_jobs_pending",
    "Jobs waiting in JetStream for a worker, per tier (consumer lag).",
    ["tier", "model_name"],
    multiprocess_mode=_MODE,
)
ACK_PENDING = Gauge(
    "twolane_jobs_ack_pending",
    "Jobs delivered to a worker and not yet acked (running or due for redelivery), per tier.",
    ["tier", "model_name"],
    multiprocess_mode=_MODE,
)
DEAD_LETTERS = Gauge(
    "twolane_jobs_dead_letters",
    "Jobs on the dead-letter stream (TWOLANE_DLQ; webhook deliveries not counted).",
    ["model_name"],
    multiprocess_mode=_MODE,
)
OLDEST_QUEUED_AGE_S = Gauge(
    "twolane_jobs_oldest_queued_age_seconds",
    "Age of the oldest job still in the queue (0 when it is empty).",
    ["model_name"],
    multiprocess_mode=_MODE,
)
FINISHED = Counter(
    "twolane_jobs_finished",
    "Jobs that reached a final state here, by state.",
    ["state", "model_name"],
)
QUEUE_TIME_S = Histogram(
    "twolane_job_queue_time_seconds",
    "Submission to a worker's claim.",
    ["tier", "model_name"],
    buckets=_JOB_BUCKETS_S,
)
RUN_TIME_S = Histogram(
    "twolane_job_run_time_seconds",
    "A worker's claim to the job's end.",
    ["tier", "model_name"],
    buckets=_JOB_BUCKETS_S,
)


class JobMetrics:
    def __init__(self, js: JetStreamContext, store: JobStore, model_name: str) -> None:
        self._js = js
        self._store = store
        self.model_name = model_name
        self._task: asyncio.Task[None] | None = None
        # Series exist from the start, at 0, so dashboards and alerts find them.
        for state in ("succeeded", "failed", "cancelled", "expired"):
            FINISHED.labels(state, model_name)
        for tier in jetstream.TIERS:
            QUEUE_TIME_S.labels(tier, model_name)
            RUN_TIME_S.labels(tier, model_name)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._poll_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def claimed(self, tier: str, queued_s: float) -> None:
        QUEUE_TIME_S.labels(tier, self.model_name).observe(max(0.0, queued_s))

    def finished(self, tier: str, state: jobs_pb2.JobState.ValueType, run_s: float) -> None:
        name = jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()
        FINISHED.labels(name, self.model_name).inc()
        RUN_TIME_S.labels(tier, self.model_name).observe(max(0.0, run_s))

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self._poll()
            except Exception as exc:  # NATS away: the gauges keep their last values
                log.debug("job metrics poll failed", error=repr(exc))
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _poll(self) -> None:
        pending: collections.Counter[str] = collections.Counter()
        ack_pending: collections.Counter[str] = collections.Counter()
        for info in await self._js.consumers_info(jetstream.JOBS_STREAM):
            lane = jetstream.lane_of_consumer(info.name)
            if lane is not None:
                # Optional in nats-py's ConsumerInfo; the server always sends them.
                pending[lane[0]] += info.num_pending or 0
                ack_pending[lane[0]] += info.num_ack_pending or 0
        for tier in jetstream.TIERS:
            PENDING.labels(tier, self.model_name).set(pending[tier])
            ACK_PENDING.labels(tier, self.model_name).set(ack_pending[tier])
        dead_letters = await jetstream.dead_letter_counts(self._js)
        DEAD_LETTERS.labels(self.model_name).set(dead_letters.jobs)
        OLDEST_QUEUED_AGE_S.labels(self.model_name).set(await self._oldest_age_s())

    async def _oldest_age_s(self) -> float:
        """The first message of a work-queue stream is the oldest job not yet acked."""
        info = await self._js.stream_info(jetstream.JOBS_STREAM)
        if info.state.messages == 0:
            return 0.0
        message = await self._js.get_msg(jetstream.JOBS_STREAM, seq=info.state.first_seq)
        ticket = parse_ticket(message.data or b"")
        stored = await self._store.read(ticket.job_id) if ticket is not None else None
        if stored is None:
            return 0.0
        return max(0.0, time.time() - stored.record.created_at.ToNanoseconds() / 1e9)
