"""Job records, results and events on JetStream: the state machine both lanes share.

A job moves QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED | EXPIRED (and
back to QUEUED between retries). Every change is a revision-checked KV update,
so two writers (two workers, a worker and a canceller) never both win. Results
are create-only by job id and events carry the job id as `Nats-Msg-Id`, so a
job that runs twice still has one visible result and one event.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from google.protobuf import message as protobuf_message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS

from twolane.services import jetstream, tracing
from twolane.services.availability import Availability
from twolane.services.config import JobsConfig
from twolane.services.errors import (
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    RateLimitedError,
    ResourceExhaustedError,
    UnavailableError,
    quoted,
)
from twolane.services.jetstream import DEFAULT_TENANT, Buckets
from twolane.services.validation import check_times
from twolane.services.webhook_store import webhook_status
from twolane.services.webhook_urls import RefusedUrlError, UrlPolicy
from twolane.v1 import generate_pb2, inference_pb2, job_record_pb2, jobs_pb2

log = structlog.get_logger(__name__)

TERMINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCEEDED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED,
    }
)
TIER_NAMES = {
    jobs_pb2.JOB_TIER_URGENT: "urgent",
    jobs_pb2.JOB_TIER_STANDARD: "standard",
    jobs_pb2.JOB_TIER_BULK: "bulk",
}
MAX_KEY_CHARS = 256
_STORE_FULL = 10077  # JSStreamStoreFailedF: the stream's max_msgs or max_bytes is reached
_MAX_UPDATE_TRIES = 16
TENANT_QUEUE_RETRY_S = 30.0

Validator = Callable[[generate_pb2.GenerateRequest], None]


def now_timestamp() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def tier_name(tier: jobs_pb2.JobTier.ValueType) -> str:
    return TIER_NAMES.get(tier, "standard")


def state_name(state: jobs_pb2.JobState.ValueType) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


@dataclass
class StoredRecord:
    """A job record with the KV revision it was read at."""

    record: job_record_pb2.JobRecord
    revision: int


@contextlib.asynccontextmanager
async def nats_errors(availability: Availability | None = None) -> AsyncIterator[None]:
    """NATS being away is the caller's UNAVAILABLE, never an INTERNAL error (and, with
    `availability`, the process's Jobs health turns NOT_SERVING until NATS answers)."""
    try:
        yield
    # TimeoutError: nats.py's own, or the builtin one some of its paths let through.
    except (TimeoutError, nats.errors.ConnectionClosedError) as exc:
        if availability is not None:
            availability.set(False)
        raise UnavailableError(f"the job queue is unavailable: {exc}") from exc
    except nats.errors.NoRespondersError as exc:
        if availability is not None:
            availability.set(False)
        raise UnavailableError("the job queue is unavailable: JetStream did not answer") from exc
    if availability is not None:
        availability.set(True)


class JobStore:
    """Reads and writes jobs; the gateway's JobService on top of it.

    Args:
        nc: a live NATS connection.
        buckets: the KV buckets from `jetstream.ensure_layout`.
        validate: checks a job's request before it is queued; raises
            InvalidArgumentError. The gateway of a split deployment has no model,
            so it checks the message's shape only and the worker does the rest.
        webhook_policy: which webhook URLs submissions may carry (default: https to
            public addresses only).
    """

    def __init__(
        self,
        nc: NATS,
        buckets: Buckets,
        validate: Validator,
        config: JobsConfig | None = None,
        tenant_max_queued: int | None = None,
        availability: Availability | None = None,
        webhook_policy: UrlPolicy | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.buckets = buckets
        self._validate = validate
        self._config = config or JobsConfig()
        # With auth on, each tenant may queue this many jobs (None: no per-tenant cap).
        self._tenant_max_queued = tenant_max_queued
        self._tenants_with_consumers = {DEFAULT_TENANT}
        self._availability = availability
        self._webhook_policy = webhook_policy or UrlPolicy()

    # ---- the JobService API ----------------------------------------------------

    async def submit_job(
        self, request: jobs_pb2.SubmitJobRequest, tenant: str = DEFAULT_TENANT
    ) -> jobs_pb2.SubmitJobResponse:
        self._check_submission(request)
        await self._check_webhook_url(request.webhook_url)
        if not request.tier:
            request = _with_tier(request, jobs_pb2.JOB_TIER_STANDARD)
        with tracing.tracer.start_as_current_span("job.submit"):
            return await self._submit(request, tenant)

    async def _submit(
        self, request: jobs_pb2.SubmitJobRequest, tenant: str
    ) -> jobs_pb2.SubmitJobResponse:
        async with nats_errors(self._availability):
            job_id = secrets.token_hex(16)
            if request.idempotency_key:
                key = jetstream.idempotency_key_hash(tenant, request.idempotency_key)
                try:
                    await self.buckets.idempotency.create(key, job_id.encode())
                except nats.js.errors.KeyWrongLastSequenceError:
                    return await self._existing_job(key, request, tenant)
            await self._check_tenant_queue(tenant)
            record = queued_record(job_id, tenant, request)
            await self.buckets.jobs.create(job_id, record.SerializeToString())
            try:
                await self._enqueue(record)
            except ResourceExhaustedError:
                await self._forget(record)
                raise
        log.info("job queued", job_id=job_id, tier=tier_name(request.tier), tenant=tenant)
        return jobs_pb2.SubmitJobResponse(job_id=job_id, state=jobs_pb2.JOB_STATE_QUEUED)

    async def get_result(
        self, request: jobs_pb2.GetResultRequest, tenant: str = DEFAULT_TENANT
    ) -> jobs_pb2.GetResultResponse:
        async with nats_errors(self._availability):
            stored = await self._require(request.job_id, tenant)
            record = stored.record
            response = jobs_pb2.GetResultResponse(
                job_id=record.job_id,
                state=record.state,
                custom_id=record.submission.custom_id,
                created_at=record.created_at,
            )
            if record.HasField("started_at"):
                response.started_at.CopyFrom(record.started_at)
            if record.HasField("finished_at"):
                response.finished_at.CopyFrom(record.finished_at)
            if record.state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_EXPIRED):
                response.error = record.error
            if record.state == jobs_pb2.JOB_STATE_SUCCEEDED:
                result = await self.read_result(record.job_id)
                if result is None:
                    response.error = "the result has expired"
                else:
                    response.result.CopyFrom(result)
            if record.submission.webhook_url:
                response.webhook.CopyFrom(
                    await webhook_status(self.buckets.webhooks, record.job_id)
                )
            return response

    async def cancel_job(
        self, request: jobs_pb2.CancelJobRequest, tenant: str = DEFAULT_TENANT
    ) -> jobs_pb2.CancelJobResponse:
        async with nats_errors(self._availability):
            await self._require(request.job_id, tenant)

            def cancel(record: job_record_pb2.JobRecord) -> bool:
                if record.state in TERMINAL_STATES:
                    return False
                record.state = jobs_pb2.JOB_STATE_CANCELLED
                record.finished_at.CopyFrom(now_timestamp())
                return True

            stored, changed = await self.transition(request.job_id, cancel)
            if changed:
                # The worker running it, if any, aborts it in the engine.
                await self.nc.publish(jetstream.cancel_subject(request.job_id), b"")
                await self.publish_event(stored.record)
                log.info("job cancelled", job_id=request.job_id)
        return jobs_pb2.CancelJobResponse(job_id=request.job_id, state=stored.record.state)

    # ---- shared with the worker --------------------------------------------------

    async def read(self, job_id: str) -> StoredRecord | None:
        if not _is_job_id(job_id):
            return None
        try:
            entry = await self.buckets.jobs.get(job_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        assert entry.value is not None and entry.revision is not None
        return StoredRecord(job_record_pb2.JobRecord.FromString(entry.value), entry.revision)

    async def transition(
        self,
        job_id: str,
        change: Callable[[job_record_pb2.JobRecord], bool],
        just_read: StoredRecord | None = None,
    ) -> tuple[StoredRecord, bool]:
        """Apply `change` to the latest record with a revision check, retrying on races.

        `change` edits the record in place and returns False to leave it as it is.
        Returns the record as it now stands and whether `change` was written.
        `just_read`, a record the caller read a moment ago, saves a round trip: a write
        from it still checks its revision, and a decision not to write is taken again
        on a fresh read.
        """
        candidate = None
        if just_read is not None:
            candidate = StoredRecord(job_record_pb2.JobRecord(), just_read.revision)
            candidate.record.CopyFrom(just_read.record)
        for _ in range(_MAX_UPDATE_TRIES):
            stored, from_caller, candidate = candidate, candidate is not None, None
            if stored is None:
                stored = await self.read(job_id)
            if stored is None:
                raise NotFoundError(f"no job with id {quoted(job_id)}")
            if not change(stored.record):
                if from_caller:
                    continue
                return stored, False
            try:
                revision = await self.buckets.jobs.update(
                    job_id, stored.record.SerializeToString(), last=stored.revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return StoredRecord(stored.record, revision), True
        raise UnavailableError(f"job {job_id} is changing too often to update")

    async def read_result(self, job_id: str) -> generate_pb2.GenerateResponse | None:
        try:
            entry = await self.buckets.results.get(job_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        assert entry.value is not None
        return generate_pb2.GenerateResponse.FromString(entry.value)

    async def write_result(self, job_id: str, result: generate_pb2.GenerateResponse) -> bool:
        """Create-only: a result written by an earlier attempt stays the one result.
        Returns whether this one was written."""
        try:
            await self.buckets.results.create(job_id, result.SerializeToString())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def event_published(self, record: job_record_pb2.JobRecord) -> bool:
        subject = jetstream.result_subject(record.tenant, record.job_id)
        try:
            await self.js.get_last_msg(jetstream.RESULTS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def publish_event(
        self,
        record: job_record_pb2.JobRecord,
        result: generate_pb2.GenerateResponse | None = None,
    ) -> None:
        """The completion event, published by whoever made the final transition.

        Its Nats-Msg-Id keeps a second publish out of the stream, but a plain
        subscriber would still see it, so callers publish at most once. `result`, the
        one the caller just wrote, saves reading it back.
        """
        event = jobs_pb2.JobEvent(
            job_id=record.job_id,
            tenant=record.tenant,
            state=record.state,
            error=record.error if record.state != jobs_pb2.JOB_STATE_SUCCEEDED else "",
            custom_id=record.submission.custom_id,
            finished_at=record.finished_at,
        )
        if record.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            if result is None:
                result = await self.read_result(record.job_id)
            if result is not None:
                event.result.CopyFrom(result)
        # In the job's own trace, whoever publishes (the worker, or a canceller).
        parent = tracing.context_from_headers(_trace_headers(record))
        with tracing.tracer.start_as_current_span("job.event_publish", context=parent):
            await self.js.publish(
                jetstream.result_subject(record.tenant, record.job_id),
                event.SerializeToString(),
                stream=jetstream.RESULTS_STREAM,
                headers=tracing.inject({jetstream.MSG_ID_HEADER: record.job_id}),
            )

    # ---- helpers -----------------------------------------------------------------

    def _check_submission(self, request: jobs_pb2.SubmitJobRequest) -> None:
        violations: list[FieldViolation] = []
        if request.tier not in (jobs_pb2.JOB_TIER_UNSPECIFIED, *TIER_NAMES):
            violations.append(FieldViolation("tier", f"unknown tier {request.tier}"))
        if len(request.idempotency_key) > MAX_KEY_CHARS:
            violations.append(
                FieldViolation("idempotency_key", f"at most {MAX_KEY_CHARS} characters")
            )
        if len(request.custom_id) > MAX_KEY_CHARS:
            violations.append(FieldViolation("custom_id", f"at most {MAX_KEY_CHARS} characters"))
        num_checked = len(violations)
        check_times(request, lambda field, why: violations.append(FieldViolation(field, why)))
        times_valid = len(violations) == num_checked
        if (
            times_valid
            and request.HasField("deadline")
            and request.deadline.ToNanoseconds() <= time.time_ns()
        ):
            violations.append(FieldViolation("deadline", "the deadline has already passed"))
        if not request.HasField("request"):
            violations.append(FieldViolation("request", "a job needs a generate request"))
        else:
            try:
                self._validate(request.request)
            except InvalidArgumentError as exc:
                violations.extend(exc.violations)
        if violations:
            raise InvalidArgumentError(violations)

    async def _check_webhook_url(self, url: str) -> None:
        """The SSRF rules, before anything is queued (the deliverer checks again when it
        connects)."""
        if not url:
            return
        try:
            await self._webhook_policy.check(url)
        except RefusedUrlError as exc:
            raise InvalidArgumentError([FieldViolation("webhook_url", str(exc))]) from exc

    async def fill_backlog(self, reply: inference_pb2.GetStatsResponse) -> None:
        """The queue's figures for GetStats: jobs per tier waiting and running, dead letters
        of jobs and of webhook deliveries.

        Raises:
            UnavailableError: NATS does not answer.
        """
        queued: dict[str, int] = dict.fromkeys(jetstream.TIERS, 0)
        running = dict(queued)
        async with nats_errors(self._availability):
            for info in await self.js.consumers_info(jetstream.JOBS_STREAM):
                lane = jetstream.lane_of_consumer(info.name)
                if lane is not None:
                    # Optional in nats-py's ConsumerInfo; the server always sends them.
                    queued[lane[0]] += info.num_pending or 0
                    running[lane[0]] += info.num_ack_pending or 0
            dead_letters = await jetstream.dead_letter_counts(self.js)
        for tier in jetstream.TIERS:
            reply.backlog.add(tier=tier, num_queued=queued[tier], num_running=running[tier])
        reply.num_dead_letters = dead_letters.jobs
        reply.num_webhook_dead_letters = dead_letters.webhooks

    async def _check_tenant_queue(self, tenant: str) -> None:
        """Refuse a job past the tenant's queue cap: one tenant must not fill the shared
        queue (every tenant's jobs share TWOLANE_JOBS and its limits)."""
        if self._tenant_max_queued is None:
            return
        subjects = {jetstream.job_subject(tier, tenant) for tier in jetstream.TIERS}
        info = await self.js.stream_info(
            jetstream.JOBS_STREAM, subjects_filter=jetstream.job_subject("*", tenant)
        )
        num_queued = sum(n for s, n in (info.state.subjects or {}).items() if s in subjects)
        if num_queued >= self._tenant_max_queued:
            raise RateLimitedError(
                f"tenant {tenant!r} has {num_queued} jobs queued, its limit; "
                "retry when some have run",
                retry_after_s=TENANT_QUEUE_RETRY_S,
            )

    async def _enqueue(self, record: job_record_pb2.JobRecord) -> None:
        ticket = job_record_pb2.JobTicket(job_id=record.job_id, tenant=record.tenant)
        if record.tenant not in self._tenants_with_consumers:
            await jetstream.ensure_tenant_consumers(self.js, self._config, record.tenant)
            self._tenants_with_consumers.add(record.tenant)
        try:
            await self.js.publish(
                jetstream.job_subject(tier_name(record.submission.tier), record.tenant),
                ticket.SerializeToString(),
                stream=jetstream.JOBS_STREAM,
                headers={jetstream.MSG_ID_HEADER: record.job_id, **_trace_headers(record)},
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STORE_FULL:
                raise ResourceExhaustedError(
                    f"the job queue is full ({exc.description}); retry later"
                ) from exc
            raise

    async def _existing_job(
        self, key: str, request: jobs_pb2.SubmitJobRequest, tenant: str
    ) -> jobs_pb2.SubmitJobResponse:
        """A repeated idempotency key: the first submission's job, queued if need be."""
        entry = await self.buckets.idempotency.get(key)
        assert entry.value is not None
        job_id = entry.value.decode()
        stored = await self.read(job_id)
        if stored is None:
            # The first submitter has not written the record yet (or died before it
            # did): write it from this identical request.
            record = queued_record(job_id, tenant, request)
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self.buckets.jobs.create(job_id, record.SerializeToString())
            await self._enqueue(record)
            state = jobs_pb2.JOB_STATE_QUEUED
        else:
            state = stored.record.state
            if state == jobs_pb2.JOB_STATE_QUEUED:
                # The first submitter may have died between the record and the ticket:
                # queue it again. Within the stream's duplicate window the ticket's
                # Nats-Msg-Id (the job id) keeps it one message; after it, a second
                # ticket is dropped by the worker's claim (one stream sequence runs).
                await self._enqueue(stored.record)
        log.info("job deduplicated", job_id=job_id, tenant=tenant)
        return jobs_pb2.SubmitJobResponse(job_id=job_id, deduplicated=True, state=state)

    async def _forget(self, record: job_record_pb2.JobRecord) -> None:
        """Undo a submission the queue refused, so its id never shows up."""
        with contextlib.suppress(nats.js.errors.Error):
            await self.buckets.jobs.purge(record.job_id)
        if record.submission.idempotency_key:
            key = jetstream.idempotency_key_hash(record.tenant, record.submission.idempotency_key)
            with contextlib.suppress(nats.js.errors.Error):
                await self.buckets.idempotency.purge(key)

    async def _require(self, job_id: str, tenant: str) -> StoredRecord:
        stored = await self.read(job_id)
        # Another tenant's job is as unknown as a job that never existed.
        if stored is None or stored.record.tenant != tenant:
            raise NotFoundError(f"no job with id {quoted(job_id)}")
        return stored


def _with_tier(
    request: jobs_pb2.SubmitJobRequest, tier: jobs_pb2.JobTier.ValueType
) -> jobs_pb2.SubmitJobRequest:
    copy = jobs_pb2.SubmitJobRequest()
    copy.CopyFrom(request)
    copy.tier = tier
    return copy


def _is_job_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def parse_ticket(data: bytes) -> job_record_pb2.JobTicket | None:
    try:
        ticket = job_record_pb2.JobTicket.FromString(data)
    except protobuf_message.DecodeError:
        return None
    return ticket if _is_job_id(ticket.job_id) else None


def _trace_headers(record: job_record_pb2.JobRecord) -> dict[str, str]:
    return {"traceparent": record.traceparent} if record.traceparent else {}


def queued_record(
    job_id: str, tenant: str, request: jobs_pb2.SubmitJobRequest
) -> job_record_pb2.JobRecord:
    """A new job's record, as it enters the queue."""
    return job_record_pb2.JobRecord(
        job_id=job_id,
        tenant=tenant,
        state=jobs_pb2.JOB_STATE_QUEUED,
        submission=request,
        created_at=now_timestamp(),
        traceparent=tracing.inject().get("traceparent", ""),
    )
