"""The batch lane's consumer: pulls jobs when the engine has room and runs them.

The backlog stays in JetStream. The worker fetches only as many jobs as the
engine can take now (a cap on batch jobs in flight, free KV blocks, and no
interactive request waiting), urgent before standard before bulk. A running
job reports progress so its message is not redelivered; a worker that dies
stops reporting, and the message goes to another worker after `ack_wait_s`,
unless the worker restarts first: it then gives back at once what it held
(see worker_slot.py).

The worker, not JetStream, counts deliveries against `max_deliver`: the consumers
redeliver without limit, and the first worker to see a delivery past the limit
dead-letters the job. JetStream's own limit would end with an advisory that is lost
when no worker listens at that moment, leaving the job RUNNING forever.

Per job, in this order: result (create-only), state, completion event, ack.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from twolane.scheduler.errors import EngineStoppedError
from twolane.scheduler.request import Priority
from twolane.services import convert, jetstream, tracing
from twolane.services.config import JobsConfig
from twolane.services.errors import (
    InvalidArgumentError,
    RequestAbortedError,
    RequestDeadlineError,
    RequestFailedError,
    UnavailableError,
)
from twolane.services.generation import RequestOutput, generate, trace_phases
from twolane.services.jetstream import Lane
from twolane.services.job_metrics import JobMetrics
from twolane.services.job_store import (
    TERMINAL_STATES,
    JobStore,
    now_timestamp,
    parse_ticket,
    tier_name,
)
from twolane.services.validation import ModelLimits, validate_generate
from twolane.services.worker_slot import WorkerSlot
from twolane.v1 import generate_pb2, job_record_pb2, jobs_pb2

if TYPE_CHECKING:
    from twolane.scheduler.client import EngineClient
    from twolane.services.prompts import ModelPrompts

log = structlog.get_logger(__name__)

FETCH_TIMEOUT_S = 0.5
# How often the worker looks for job consumers of tenants it has not seen yet.
CONSUMER_REFRESH_S = 5.0
IDLE_POLL_S = 1.0
MAX_RETRY_BACKOFF_S = 60.0
# Below this share of free KV blocks the worker leaves the room to running work.
MIN_FREE_BLOCKS_FRACTION = 0.02
# A job whose engine core went away is given back after this long, so the restarted
# core (or another worker) takes it without a hot redelivery loop.
ENGINE_GONE_DELAY_S = 2.0
NAK = b"-NAK"  # the JetStream ack protocol's negative acknowledgement


class TransientJobError(Exception):
    """This attempt failed, the next one may not: retry with backoff."""


@dataclass
class _Running:
    """One job message this worker handles, and the newest delivery of it.

    JetStream redelivers a message whose progress reports came too late (a busy
    machine); when the worker already runs it, the run goes on and settles the newest
    delivery, whose reply subject is the one JetStream now waits on.
    """

    msg: Msg
    job_id: str
    lane: Lane
    sequence: int  # the message's stream sequence: the same on every delivery
    replies: list[str]  # every delivery's reply subject, held in the slot until the end
    request_id: str = ""  # the engine request, once the job runs
    cancelled: bool = False
    # Set once its delivery is settled: a redelivery after that is a message of its own.
    settled: bool = False


class JobWorker:
    """Runs jobs from TWOLANE_JOBS on one engine.

    Args:
        nc: a live NATS connection.
        store: the job records, results and events.
        engine: a ready client of the engine core the jobs run on (priority = the tier).
        prompts: the engine's model's tokenizer and chat template.
        config: ack wait, deliveries, backoff, in-flight cap, fault injection.
        slot: this worker's identity (it names the worker in job records and logs) and
            its record of the messages it holds.
        tenant_limits: a tenant's limit of concurrent requests (0: none), with auth on.
        metrics: where claims and endings are counted.
    """

    def __init__(
        self,
        nc: NATS,
        store: JobStore,
        engine: EngineClient,
        prompts: ModelPrompts,
        config: JobsConfig,
        slot: WorkerSlot,
        tenant_limits: Callable[[str], int] | None = None,
        metrics: JobMetrics | None = None,
    ) -> None:
        assert engine.info is not None, "the engine client must be ready"
        self.metrics = metrics
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.store = store
        self.engine = engine
        self.prompts = prompts
        self.limits = ModelLimits(
            vocab_size=engine.info.vocab_size, max_model_len=engine.info.max_model_len
        )
        self.config = config
        self.slot = slot
        self.worker_id = slot.worker_id
        self.max_inflight = config.max_batch_inflight or engine.info.max_num_seqs
        # One pull consumer per tier and tenant (the default tenant's are the tier's own).
        self._subs: dict[Lane, JetStreamContext.PullSubscription] = {}
        self._tasks: dict[asyncio.Task[None], _Running] = {}
        self._num_inflight: collections.Counter[Lane] = collections.Counter()
        self._turn: dict[str, int] = collections.defaultdict(int)  # round robin, per tier
        self._consumers_checked_s = 0.0
        self._tenant_limits = tenant_limits or (lambda tenant: 0)
        self._running: dict[str, _Running] = {}
        # Room: set after an engine step or a finished job. Work: set by a new job.
        self._room_changed = asyncio.Event()
        self._work_arrived = asyncio.Event()
        self._stopping = False
        self._pull_task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._core_subs: list[Subscription] = []

    # ---- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self._bind_consumers()
        self._core_subs = [
            # A new job anywhere wakes the pull loop; no payload is read.
            await self.nc.subscribe("twolane.jobs.>", cb=self._on_new_job),
            await self.nc.subscribe(f"{jetstream.CANCEL_SUBJECT_PREFIX}.*", cb=self._on_cancel),
        ]
        # Before pulling: nothing this incarnation holds may be given back by mistake.
        num_reclaimed = await self._reclaim()
        self.engine.add_ready_listener(self._on_engine_ready)
        self._load_task = asyncio.create_task(self._follow_load(), name="twolane-job-load")
        self._pull_task = asyncio.create_task(self._pull_loop(), name="twolane-job-pull")
        log.info(
            "job worker started",
            worker_id=self.worker_id,
            max_inflight=self.max_inflight,
            num_reclaimed=num_reclaimed,
        )

    async def _reclaim(self) -> int:
        """Give back now the messages this worker's previous incarnation held when it
        died, instead of leaving them to the ack wait; returns how many.

        Any client may NAK a JetStream message through its reply subject. A job another
        worker has taken since (redelivered after the ack wait) is left alone; for the
        rest the claim's revision check still keeps a job from running twice at once.
        """
        num_reclaimed = 0
        for held in self.slot.take_previous():
            stored = await self.store.read(held.job_id) if held.job_id else None
            if stored is not None:
                record = stored.record
                if (
                    record.state == jobs_pb2.JOB_STATE_RUNNING
                    and record.worker_id != self.worker_id
                ):
                    continue
            await self.nc.publish(held.reply_subject, NAK)
            num_reclaimed += 1
        if num_reclaimed:
            await self.nc.flush()
            log.info(
                "jobs reclaimed from the last run", worker_id=self.worker_id, num_jobs=num_reclaimed
            )
        return num_reclaimed

    async def stop(self, grace_s: float) -> None:
        """Stop pulling, let running jobs finish for `grace_s`, give the rest back."""
        self._stopping = True
        self._room_changed.set()
        self._work_arrived.set()
        if self._pull_task is not None:
            await self._pull_task
        if self._load_task is not None:
            self._load_task.cancel()
        tasks = list(self._tasks)
        if tasks:
            log.info("job worker draining", num_jobs=len(tasks), grace_period_s=grace_s)
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        subs: list[Subscription | JetStreamContext.PullSubscription] = [
            *self._core_subs,
            *self._subs.values(),
        ]
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        log.info("job worker stopped", worker_id=self.worker_id)

    # ---- pulling -----------------------------------------------------------------

    def room(self) -> int:
        """How many more jobs the engine should take now."""
        load = self.engine.load
        if not self.engine.is_ready or load is None or load.num_waiting_interactive > 0:
            return 0
        min_free = max(1, int(load.num_total_blocks * MIN_FREE_BLOCKS_FRACTION))
        if load.num_free_blocks < min_free:
            return 0
        return max(0, self.max_inflight - len(self._tasks))

    async def _pull_loop(self) -> None:
        while not self._stopping:
            # Cleared before looking, so a change while we look is not missed.
            self._room_changed.clear()
            self._work_arrived.clear()
            room = self.room()
            if room == 0:
                await _wait(self._room_changed, IDLE_POLL_S)
                continue
            try:
                pulled = await self._pull(room)
            except Exception as exc:  # NATS is away or restarting: keep trying
                log.warning("job pull failed", error=repr(exc))
                pulled = False
            if not pulled:
                # Also polls: a retry's backoff ends without any new message.
                await _wait(self._work_arrived, IDLE_POLL_S)

    async def _pull(self, room: int) -> bool:
        """Fetch up to `room` jobs from the highest tier that has any, taking turns across
        the tenants with jobs in that tier (and room under their concurrency limit)."""
        if time.monotonic() - self._consumers_checked_s > CONSUMER_REFRESH_S:
            await self._bind_consumers()
        waiting = await self._waiting_lanes()
        for tier in jetstream.TIERS:
            lanes = [lane for lane in waiting if lane[0] == tier and self._tenant_has_room(lane)]
            if not lanes:
                continue
            start = self._turn[tier] % len(lanes)
            self._turn[tier] += 1
            share = -(-room // len(lanes))  # each tenant's turn: an equal share of the room
            pulled = False
            for lane in lanes[start:] + lanes[:start]:
                if room <= 0:
                    break
                try:
                    msgs = await self._subs[lane].fetch(min(share, room), timeout=FETCH_TIMEOUT_S)
                # nats.py raises its own TimeoutError or, on some paths, the builtin one.
                except TimeoutError:
                    continue
                for msg in msgs:
                    self._start(msg, lane)
                room -= len(msgs)
                pulled = True
            if pulled:
                return True
        return False

    async def _waiting_lanes(self) -> list[Lane]:
        """The (tier, tenant) lanes whose subject holds messages no job here is running:
        queued ones, or unacked ones due for redelivery (a retry after its backoff, a job
        whose worker died). One stream query counts every subject at once."""
        info = await self.js.stream_info(jetstream.JOBS_STREAM, subjects_filter="twolane.jobs.>")
        lanes = []
        for subject, count in (info.state.subjects or {}).items():
            lane = jetstream.lane_of_subject(subject)
            if lane is None:
                continue
            if lane not in self._subs:
                self._consumers_checked_s = 0.0  # a new tenant: bind its consumers next time
                continue
            held_here = self._num_inflight[lane] + self._subs[lane].pending_msgs
            if count > held_here or self._subs[lane].pending_msgs > 0:
                lanes.append(lane)
        return sorted(lanes)

    def _tenant_has_room(self, lane: Lane) -> bool:
        """Whether the lane's tenant is under its limit of concurrent requests (interactive
        ones and running jobs, as the engine core counts them)."""
        limit = self._tenant_limits(lane[1])
        if limit <= 0:
            return True
        held = self.engine.held_for_tenant(lane[1]) or 0
        mine_not_started = sum(
            n for (_, tenant), n in self._num_inflight.items() if tenant == lane[1]
        )
        return max(held, mine_not_started) < limit

    async def _bind_consumers(self) -> None:
        """A pull subscription for every job consumer on the stream (tenants come and go)."""
        self._consumers_checked_s = time.monotonic()
        for info in await self.js.consumers_info(jetstream.JOBS_STREAM):
            lane = jetstream.lane_of_consumer(info.name)
            if lane is not None and lane not in self._subs:
                self._subs[lane] = await self.js.pull_subscribe_bind(
                    info.name, stream=jetstream.JOBS_STREAM
                )

    def _start(self, msg: Msg, lane: Lane) -> None:
        ticket = parse_ticket(msg.data)
        job_id = ticket.job_id if ticket is not None else ""
        self.slot.hold(msg.reply, job_id)
        sequence = msg.metadata.sequence.stream
        running = self._running.get(job_id) if job_id else None
        if running is not None and running.sequence == sequence and not running.settled:
            # Not a second run: that would spend the job's deliveries on a copy of itself.
            running.msg = msg
            running.replies.append(msg.reply)
            log.info(
                "job redelivered while it runs here; the run goes on",
                job_id=job_id,
                delivery=msg.metadata.num_delivered,
            )
            return
        running = _Running(msg, job_id, lane, sequence, replies=[msg.reply])
        if job_id and (job_id not in self._running or self._running[job_id].settled):
            self._running[job_id] = running
        task = asyncio.create_task(self._run(running, lane[0]))
        self._tasks[task] = running
        self._num_inflight[lane] += 1
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        running = self._tasks.pop(task)
        if self._running.get(running.job_id) is running:
            del self._running[running.job_id]
        for reply in running.replies:
            self.slot.release(reply)
        self._num_inflight[running.lane] -= 1
        self._room_changed.set()

    async def _follow_load(self) -> None:
        """Every load the engine core publishes (after its steps) may mean room."""
        while True:
            await self.engine.wait_load_change(IDLE_POLL_S)
            self._room_changed.set()

    def _on_engine_ready(self, ready: bool) -> None:
        if ready:
            log.info("engine back; pulling jobs again", worker_id=self.worker_id)
        else:
            log.warning("engine gone; no jobs pulled until it is back", worker_id=self.worker_id)
        self._room_changed.set()

    async def _on_new_job(self, msg: Msg) -> None:
        self._work_arrived.set()

    async def _on_cancel(self, msg: Msg) -> None:
        running = self._running.get(msg.subject.rsplit(".", 1)[-1])
        if running is not None:
            running.cancelled = True
            self.engine.abort(running.request_id)

    # ---- one job -----------------------------------------------------------------

    async def _run(self, running: _Running, tier: str) -> None:
        """Handle one message; whatever happens, its newest delivery is acked, nacked or
        terminated."""
        parent = tracing.context_from_headers(running.msg.headers)
        try:
            with tracing.tracer.start_as_current_span("job.run", context=parent) as span:
                span.set_attribute("twolane.tier", tier)
                await self._handle(running, tier)
        except asyncio.CancelledError:
            # The worker is stopping: hand the job to another worker now.
            with contextlib.suppress(Exception):
                await running.msg.nak()
            raise
        except Exception as exc:
            log.warning("job attempt failed", error=repr(exc), subject=running.msg.subject)
            with contextlib.suppress(Exception):
                await running.msg.nak(delay=self._backoff_s(running.msg))
        finally:
            running.settled = True

    async def _handle(self, running: _Running, tier: str) -> None:
        msg = running.msg
        ticket = parse_ticket(msg.data)
        if ticket is None:
            log.error("unreadable job message terminated", subject=msg.subject)
            await running.msg.term()
            return
        job_id = ticket.job_id
        structlog.contextvars.bind_contextvars(job_id=job_id, tenant=ticket.tenant)
        stored = await self.store.read(job_id)
        if stored is None:
            log.error("job message without a record terminated", job_id=job_id)
            await running.msg.term()
            return
        sequence = msg.metadata.sequence.stream
        if stored.record.state in TERMINAL_STATES:
            await self._settle_finished(running, stored.record)
            return
        if msg.metadata.num_delivered > self.config.max_deliver:
            # Every allowed delivery ended without settling: its worker died or stopped.
            error = (
                f"no worker finished the job in {self.config.max_deliver} deliveries; "
                "the last one stopped or died while running it"
            )
            await self._dead_letter(tier, job_id, error, self.config.max_deliver)
            await running.msg.term()
            return
        if _deadline_passed(stored.record):
            await self._finish(job_id, jobs_pb2.JOB_STATE_EXPIRED, "the deadline passed")
            await running.msg.ack()
            return

        def claim(record: job_record_pb2.JobRecord) -> bool:
            duplicate = (
                record.state == jobs_pb2.JOB_STATE_RUNNING and record.stream_sequence != sequence
            )
            if record.state in TERMINAL_STATES or duplicate:
                return False
            record.state = jobs_pb2.JOB_STATE_RUNNING
            record.started_at.CopyFrom(now_timestamp())
            record.stream_sequence = sequence
            record.worker_id = self.worker_id
            record.attempts += 1
            return True

        queued_since_ns = stored.record.created_at.ToNanoseconds()
        tracing.past_span_wall("job.queued", queued_since_ns, job_id=job_id)
        if self.metrics is not None:
            self.metrics.claimed(tier, (time.time_ns() - queued_since_ns) / 1e9)
        with tracing.tracer.start_as_current_span("job.claim"):
            stored, claimed = await self.store.transition(job_id, claim, just_read=stored)
        if not claimed:
            if stored.record.state in TERMINAL_STATES:
                await self._settle_finished(running, stored.record)
            else:
                await running.msg.ack()  # a second ticket for a job another message runs
            return
        log.info(
            "job started",
            job_id=job_id,
            tier=tier,
            delivery=msg.metadata.num_delivered,
            worker_id=self.worker_id,
        )
        await self._execute(running, tier, stored.record)

    async def _execute(
        self, running: _Running, tier: str, record: job_record_pb2.JobRecord
    ) -> None:
        job_id = record.job_id
        running.request_id = f"job-{job_id}-{running.msg.metadata.num_delivered}"
        heartbeat = asyncio.create_task(self._heartbeat(job_id, running))
        started_s = time.monotonic()
        try:
            outputs = await self._generate(running.request_id, tier, record)
        except InvalidArgumentError as exc:
            # It can never succeed: fail it now rather than retry it.
            await self._finish(job_id, jobs_pb2.JOB_STATE_FAILED, f"invalid request: {exc}")
            await running.msg.term()
            return
        except RequestDeadlineError:
            await self._finish(job_id, jobs_pb2.JOB_STATE_EXPIRED, "the deadline passed")
            await running.msg.ack()
            return
        except RequestAbortedError:
            await self._settle_abort(job_id, running)
            return
        except (EngineStoppedError, UnavailableError) as exc:
            await self._give_back(running, job_id, str(exc))
            return
        except (TransientJobError, RequestFailedError) as exc:
            await self._retry_or_dead_letter(running, tier, job_id, str(exc))
            return
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        trace_phases(outputs[-1], started_s)
        result = convert.generate_response(job_id, outputs, time.monotonic() - started_s)
        await self._finish(job_id, jobs_pb2.JOB_STATE_SUCCEEDED, "", result)
        await running.msg.ack()
        log.info("job succeeded", job_id=job_id, completion_tokens=outputs[-1].num_output_tokens)

    async def _settle_abort(self, job_id: str, running: _Running) -> None:
        stored = await self.store.read(job_id)
        if running.cancelled or (
            stored is not None and stored.record.state == jobs_pb2.JOB_STATE_CANCELLED
        ):
            await running.msg.ack()  # the canceller wrote the state and the event
            log.info("job aborted after cancel", job_id=job_id)
        else:
            await running.msg.nak()  # the engine is stopping; another worker takes it

    async def _give_back(self, running: _Running, job_id: str, reason: str) -> None:
        """The engine core went away mid-job: queue the job again, not as its failure."""

        def requeue(record: job_record_pb2.JobRecord) -> bool:
            if record.state != jobs_pb2.JOB_STATE_RUNNING:
                return False
            record.state = jobs_pb2.JOB_STATE_QUEUED
            return True

        with contextlib.suppress(Exception):
            await self.store.transition(job_id, requeue)
        log.warning("job given back", job_id=job_id, retry_in_s=ENGINE_GONE_DELAY_S, error=reason)
        await running.msg.nak(delay=ENGINE_GONE_DELAY_S)

    async def _generate(
        self, request_id: str, tier: str, record: job_record_pb2.JobRecord
    ) -> list[RequestOutput]:
        request = record.submission.request
        prefix = self.config.fail_prompt_prefix
        if prefix and request.prompt.startswith(prefix):
            raise TransientJobError("fault injected by TWOLANE_FAULT_FAIL_PROMPT_PREFIX")
        valid = validate_generate(request, self.limits, self.prompts, prefix="request.")
        updates = generate(
            self.engine,
            self.prompts.tokenizer,
            request_id,
            valid,
            Priority[tier.upper()],
            _engine_deadline_s(record),
            stream=False,  # a job needs only its result, not every token as it comes
            tenant=record.tenant,
        )
        return [out async for out in updates]

    async def _heartbeat(self, job_id: str, running: _Running) -> None:
        """Keep the message ours while the job runs; notice a cancel we missed."""
        interval_s = max(0.2, self.config.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(Exception):
                await running.msg.in_progress()
                stored = await self.store.read(job_id)
                if stored is not None and stored.record.state == jobs_pb2.JOB_STATE_CANCELLED:
                    running.cancelled = True
                    self.engine.abort(running.request_id)

    # ---- endings -----------------------------------------------------------------

    async def _settle_finished(self, running: _Running, record: job_record_pb2.JobRecord) -> None:
        """A message for a job that is already final (cancelled while queued, or
        finished by a worker that died before its ack): drop it once the event is out.

        Whoever made the final transition publishes the event. Only when it has not
        appeared long after the job finished is that writer presumed dead, and the
        event published here.
        """
        if await self.store.event_published(record):
            await running.msg.ack()
            return
        finished_ago_s = (time.time_ns() - record.finished_at.ToNanoseconds()) / 1e9
        if finished_ago_s < self.config.ack_wait_s:
            await running.msg.nak(delay=self.config.ack_wait_s)
            return
        await self.store.publish_event(record)
        await running.msg.ack()

    async def _finish(
        self,
        job_id: str,
        state: jobs_pb2.JobState.ValueType,
        error: str,
        result: generate_pb2.GenerateResponse | None = None,
    ) -> None:
        """Result first, then the state (unless another writer got there), then the event."""
        just_read = None
        if result is not None:
            just_read = await self.store.read(job_id)
            if just_read is not None and just_read.record.state == jobs_pb2.JOB_STATE_CANCELLED:
                return
            with tracing.tracer.start_as_current_span("job.result_write"):
                if not await self.store.write_result(job_id, result):
                    result = None  # an earlier attempt's stays the result; the event reads it

        def conclude(record: job_record_pb2.JobRecord) -> bool:
            if record.state in TERMINAL_STATES:
                return False
            record.state = state
            record.error = error
            record.finished_at.CopyFrom(now_timestamp())
            return True

        stored, concluded = await self.store.transition(job_id, conclude, just_read)
        if concluded:
            await self.store.publish_event(stored.record, result)
            if self.metrics is not None:
                record = stored.record
                run_s = (
                    record.finished_at.ToNanoseconds() - record.started_at.ToNanoseconds()
                ) / 1e9
                self.metrics.finished(tier_name(record.submission.tier), state, run_s)

    async def _retry_or_dead_letter(
        self, running: _Running, tier: str, job_id: str, reason: str
    ) -> None:
        num_delivered = running.msg.metadata.num_delivered
        if num_delivered < self.config.max_deliver:
            delay_s = self._backoff_s(running.msg)

            def requeue(record: job_record_pb2.JobRecord) -> bool:
                if record.state != jobs_pb2.JOB_STATE_RUNNING:
                    return False
                record.state = jobs_pb2.JOB_STATE_QUEUED
                record.error = f"attempt {num_delivered} failed: {reason}"
                return True

            await self.store.transition(job_id, requeue)
            log.warning(
                "job attempt failed; retrying",
                job_id=job_id,
                delivery=num_delivered,
                retry_in_s=delay_s,
                error=reason,
            )
            await running.msg.nak(delay=delay_s)
            return
        error = f"failed on all {num_delivered} deliveries; last error: {reason}"
        await self._dead_letter(tier, job_id, error, num_delivered)
        await running.msg.term()

    async def _dead_letter(self, tier: str, job_id: str, error: str, num_delivered: int) -> None:
        """Put the job on the dead-letter stream and mark it FAILED with `error`."""
        stored = await self.store.read(job_id)
        letter = job_record_pb2.DeadLetter(
            job_id=job_id,
            tenant=stored.record.tenant if stored else jetstream.DEFAULT_TENANT,
            tier=stored.record.submission.tier if stored else jobs_pb2.JOB_TIER_UNSPECIFIED,
            reason=error,
            num_deliveries=num_delivered,
            failed_at=now_timestamp(),
        )
        await self.js.publish(
            jetstream.dlq_subject(tier),
            letter.SerializeToString(),
            stream=jetstream.DLQ_STREAM,
            headers={jetstream.MSG_ID_HEADER: job_id},
        )
        await self._finish(job_id, jobs_pb2.JOB_STATE_FAILED, error)
        log.error("job dead-lettered", job_id=job_id, error=error)

    def _backoff_s(self, msg: Msg) -> float:
        num_delivered = max(1, msg.metadata.num_delivered)
        return min(MAX_RETRY_BACKOFF_S, self.config.retry_backoff_s * 2.0 ** (num_delivered - 1))


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)


def _deadline_passed(record: job_record_pb2.JobRecord) -> bool:
    submission = record.submission
    return submission.HasField("deadline") and submission.deadline.ToNanoseconds() <= time.time_ns()


def _engine_deadline_s(record: job_record_pb2.JobRecord) -> float | None:
    """The job's wall-clock deadline on the engine's clock (time.monotonic)."""
    submission = record.submission
    if not submission.HasField("deadline"):
        return None
    remaining_s = (submission.deadline.ToNanoseconds() - time.time_ns()) / 1e9
    return time.monotonic() + remaining_s
