"""Drives Batch API batches to their end, from JetStream state alone.

Every HTTP front runs one runner. It looks for batches that nobody drives (new ones,
or ones whose driver's lease ran out: that process died) and claims each with a
revision-checked update, so one process drives a batch at a time. Driving a batch:

    validating   read the input file; check every line (a bad line is recorded and
                 the rest go on); the counts' total is the number of lines
    in_progress  each good line becomes a job at bulk tier with the batch's deadline,
                 through the same SubmitJob path as gRPC; counts follow the jobs'
                 completion events (and a periodic look at their records)
    finalizing   output and error files written in OpenAI's format
    completed    (or `expired` at the deadline, `cancelled` after `cancelling`,
                 `failed` when the input file itself is unusable)

Jobs are submitted with an idempotency key per batch and line, and output files have
ids derived from the batch's: a driver that takes over from a dead one finds the jobs
already queued and writes the same files, so no work is done twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from twolane.services import jetstream
from twolane.services.batch_lines import MAX_LINES, BadLine, GoodLine, Line, parse_lines
from twolane.services.batch_store import (
    BatchError,
    BatchRecord,
    BatchStore,
    FileStore,
    StoredBatch,
)
from twolane.services.errors import (
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    RateLimitedError,
    ResourceExhaustedError,
    UnavailableError,
)
from twolane.services.job_store import TERMINAL_STATES, JobStore
from twolane.services.openai_format import (
    batch_refused_line,
    batch_result_line,
    batch_unrun_line,
    error_body,
)
from twolane.services.openai_schema import openai_field
from twolane.v1 import generate_pb2, jobs_pb2

log = structlog.get_logger(__name__)

LEASE_S = 10.0  # a driver that stops renewing loses its batches after this long
TICK_S = 1.0  # counts and the lease are written at most this often
RECHECK_S = 10.0  # how often unfinished jobs' records are read, in case an event was missed
SCAN_S = 2.0  # how often to look for batches nobody drives
RETRY_S = 1.0  # wait after a full job queue or an unreachable NATS
MAX_CONCURRENT_CALLS = 32
NUDGE_SUBJECT = "twolane.control.batches"  # core NATS: "look at this batch now"

# (endpoint, job id, result, line) -> the response body of a finished line
Render = Callable[[str, str, generate_pb2.GenerateResponse, GoodLine], dict[str, Any]]
# (tenant, tokens) -> None: counts a line against its tenant's quotas, as SubmitJob
# counts a job; raises RateLimitedError (the line waits and tries again).
Admit = Callable[[str, int], None]


class LeaseLostError(Exception):
    """Another process drives this batch now (this one's lease ran out)."""


@dataclass
class _Jobs:
    """One batch's lines as jobs: which job each line became, and where each stands."""

    job_ids: dict[int, str] = field(default_factory=dict)  # line number -> job id
    refused: dict[int, BadLine] = field(default_factory=dict)  # SubmitJob said no
    states: dict[str, int] = field(default_factory=dict)  # job id -> JobState
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def pending(self) -> list[str]:
        return [j for j in self.job_ids.values() if self.states.get(j) not in TERMINAL_STATES]

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        if event.job_id in self.states and self.states[event.job_id] not in TERMINAL_STATES:
            self.states[event.job_id] = event.state
            self.changed.set()


class BatchRunner:
    """Claims and drives batches (see the module docstring).

    Args:
        nc: a live NATS connection.
        batches, files: the Batch API's stores.
        jobs: where lines become jobs (the same store SubmitJob uses).
        render: the response body of a line whose job succeeded.
        served_model: the model a line's `body.model` must name.
        default_chat_max_tokens: a chat line's limit when it gives none.
        runner_id: names this process in the batches it claims.
        admit: counts each line against its tenant's quotas before it is queued.
    """

    def __init__(
        self,
        nc: NATS,
        batches: BatchStore,
        files: FileStore,
        jobs: JobStore,
        render: Render,
        served_model: str,
        default_chat_max_tokens: int | None,
        runner_id: str,
        admit: Admit | None = None,
    ) -> None:
        self.nc = nc
        self.admit = admit
        self.batches = batches
        self.files = files
        self.jobs = jobs
        self.render = render
        self.served_model = served_model
        self.default_chat_max_tokens = default_chat_max_tokens
        self.runner_id = runner_id
        self._driving: dict[str, asyncio.Event] = {}  # batch id -> its wake-up
        self._tasks: set[asyncio.Task[None]] = set()
        self._final_ids: set[str] = set()
        self._scan_now = asyncio.Event()
        self._scan_task: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []

    # ---- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._subs.append(await self.nc.subscribe(NUDGE_SUBJECT, cb=self._on_nudge))
        self._scan_task = asyncio.create_task(self._scan_loop(), name="twolane-batch-scan")
        log.info("batch runner started", runner_id=self.runner_id)

    async def stop(self) -> None:
        """Stop driving; hand the batches back so another process takes them at once."""
        driving = list(self._driving)
        tasks = [t for t in (self._scan_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for batch_id in driving:
            with contextlib.suppress(Exception):
                await self.batches.update(batch_id, self._release)
        log.info("batch runner stopped", runner_id=self.runner_id)

    async def nudge(self, batch_id: str) -> None:
        """Have the runner that drives `batch_id` (any process's) look at it now."""
        with contextlib.suppress(Exception):
            await self.nc.publish(NUDGE_SUBJECT, batch_id.encode())

    async def _on_nudge(self, msg: Msg) -> None:
        wake = self._driving.get(msg.data.decode(errors="replace"))
        (wake or self._scan_now).set()

    # ---- claiming ----------------------------------------------------------------

    async def _scan_loop(self) -> None:
        while True:
            self._scan_now.clear()
            try:
                await self._scan()
            except Exception as exc:  # NATS away or restarting: look again later
                log.warning("batch scan failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._scan_now.wait(), SCAN_S)

    async def _scan(self) -> None:
        for batch_id in await self.batches.ids():
            if batch_id in self._driving or batch_id in self._final_ids:
                continue
            stored, claimed = await self.batches.update(batch_id, self._claim)
            if stored.record.is_final:
                self._final_ids.add(batch_id)
            elif claimed:
                self._start(batch_id, stored)

    def _claim(self, record: BatchRecord) -> bool:
        now_s = time.time()
        if record.is_final:
            return False
        if record.owner not in ("", self.runner_id) and record.lease_until_s > now_s:
            return False
        record.owner, record.lease_until_s = self.runner_id, now_s + LEASE_S
        return True

    def _release(self, record: BatchRecord) -> bool:
        if record.owner != self.runner_id:
            return False
        record.owner, record.lease_until_s = "", 0.0
        return True

    def _start(self, batch_id: str, stored: StoredBatch) -> None:
        self._driving[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._drive(stored), name=f"twolane-batch-{batch_id}")
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._driving.pop(batch_id, None)
            if not task.cancelled() and task.exception() is None:
                self._final_ids.add(batch_id)

        task.add_done_callback(done)

    # ---- driving -----------------------------------------------------------------

    async def _drive(self, stored: StoredBatch) -> None:
        record = stored.record
        log.info("batch claimed", batch_id=record.id, status=record.status)
        try:
            await _Drive(self, record, self._driving[record.id]).run()
        except LeaseLostError:
            log.warning("batch taken over by another process", batch_id=record.id)
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch driver failed; it is resumed later", batch_id=record.id)
            raise


class _Drive:
    """One batch, from wherever it stands to its end."""

    def __init__(self, runner: BatchRunner, record: BatchRecord, wake: asyncio.Event) -> None:
        self.r = runner
        self.record = record
        self.wake = wake
        self.lines: list[Line] = []
        self.jobs = _Jobs()
        self.limit = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        self._written_at_s = time.monotonic()  # the claim has just written the lease
        self._counts_written: tuple[int, int, int] | None = None
        self._lost = False

    @property
    def batch_id(self) -> str:
        return self.record.id

    async def run(self) -> None:
        main = asyncio.current_task()
        assert main is not None

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(TICK_S)
                try:
                    await self._tick()
                except LeaseLostError:
                    self._lost = True
                    main.cancel()
                    return
                except Exception as exc:  # NATS away for a moment: try again next tick
                    log.warning(
                        "batch lease renewal failed", batch_id=self.batch_id, error=repr(exc)
                    )

        beating = asyncio.create_task(heartbeat())
        try:
            await self._run()
        except asyncio.CancelledError:
            if self._lost:
                raise LeaseLostError(self.batch_id) from None
            raise
        finally:
            beating.cancel()

    async def _run(self) -> None:
        if not await self._read_input():
            return
        if self.record.status == "validating":
            await self._update(self._begin)
        sub = await self.r.nc.subscribe(
            jetstream.result_subject(self.record.tenant, "*"), cb=self._on_event
        )
        try:
            await self._submit_all()
            await self._wait_for_jobs()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._finalize()

    # ---- validating --------------------------------------------------------------

    async def _read_input(self) -> bool:
        """Parse the input file into lines; a file that cannot be used fails the batch."""
        record = self.record
        error: BatchError | None = None
        try:
            data = await self.r.files.content(record.tenant, record.input_file_id)
            text = data.decode("utf-8")
        except NotFoundError:
            error = BatchError(code="file_not_found", message="the input file is gone")
        except UnicodeDecodeError as exc:
            error = BatchError(code="invalid_file", message=f"the input file is not UTF-8: {exc}")
        else:
            self.lines = parse_lines(
                text,
                record.endpoint,
                served_model=self.r.served_model,
                default_chat_max_tokens=self.r.default_chat_max_tokens,
            )
            if not self.lines:
                error = BatchError(code="empty_file", message="the input file has no requests")
            elif len(self.lines) > MAX_LINES:
                error = BatchError(
                    code="too_many_requests",
                    message=f"{len(self.lines)} requests; a batch has at most {MAX_LINES}",
                )
        if error is None:
            return True

        def fail(record: BatchRecord) -> bool:
            record.errors = [error]
            record.set_status("failed")
            record.owner, record.lease_until_s = "", 0.0
            return True

        await self._update(fail)
        log.info("batch failed", batch_id=record.id, error=error.message)
        return False

    def _begin(self, record: BatchRecord) -> bool:
        if record.status != "validating":
            return False
        record.request_counts.total = len(self.lines)
        record.request_counts.failed = sum(isinstance(line, BadLine) for line in self.lines)
        record.set_status("in_progress")
        return True

    # ---- in progress ---------------------------------------------------------------

    async def _submit_all(self) -> None:
        good = [line for line in self.lines if isinstance(line, GoodLine)]
        await asyncio.gather(*(self._submit(line) for line in good))
        pending = self.jobs.pending()
        await asyncio.gather(*(self._look_up_state(job_id) for job_id in pending))
        log.info(
            "batch jobs queued",
            batch_id=self.batch_id,
            num_jobs=len(self.jobs.job_ids),
            num_refused=len(self.jobs.refused),
        )

    async def _submit(self, line: GoodLine) -> None:
        key = f"batch:{self.batch_id}:{line.number}"
        request = jobs_pb2.SubmitJobRequest(
            request=line.request,
            tier=jobs_pb2.JOB_TIER_BULK,
            idempotency_key=key,
            custom_id=line.custom_id,
        )
        request.deadline.FromSeconds(self.record.expires_at)
        params = line.request.params
        num_tokens = len(line.request.prompt_token_ids) or len(line.request.prompt)
        num_tokens += params.max_tokens if params.HasField("max_tokens") else 16
        while True:
            wait_s = RETRY_S
            async with self.limit:
                # A batch being stopped queues nothing new, even after a restart.
                job_id = await self._existing_job(key)
                if job_id is None and self._stopping():
                    return
                try:
                    if job_id is None and self.r.admit is not None:
                        self.r.admit(self.record.tenant, num_tokens)
                    # Submitted before a restart too: the same key returns that job, and
                    # queues it again if its submitter died before queueing its ticket.
                    response = await self.r.jobs.submit_job(request, self.record.tenant)
                    job_id = response.job_id
                except InvalidArgumentError as exc:
                    self.jobs.refused[line.number] = _refused(line, exc)
                    return
                except RateLimitedError as exc:
                    # Over the tenant's quota: the batch goes at the rate the quota allows.
                    wait_s = min(max(exc.retry_after_s, RETRY_S), 60.0)
                    job_id = None
                except (ResourceExhaustedError, UnavailableError) as exc:
                    log.info("batch line waits for room", batch_id=self.batch_id, error=str(exc))
                    job_id = None
            if job_id is not None:
                self.jobs.job_ids[line.number] = job_id
                self.jobs.states.setdefault(job_id, jobs_pb2.JOB_STATE_QUEUED)
                return
            await asyncio.sleep(wait_s)

    async def _existing_job(self, key: str) -> str | None:
        hashed = jetstream.idempotency_key_hash(self.record.tenant, key)
        try:
            entry = await self.r.jobs.buckets.idempotency.get(hashed)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def _look_up_state(self, job_id: str) -> None:
        async with self.limit:
            stored = await self.r.jobs.read(job_id)
        if stored is not None and self.jobs.states.get(job_id) not in TERMINAL_STATES:
            self.jobs.states[job_id] = stored.record.state

    async def _on_event(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            self.jobs.on_event(jobs_pb2.JobEvent.FromString(msg.data))

    async def _wait_for_jobs(self) -> None:
        checked_at_s = time.monotonic()
        while pending := self.jobs.pending():
            if self._stopping() or time.time() >= self.record.expires_at:
                await asyncio.gather(*(self._cancel(job_id) for job_id in pending))
                continue
            self.jobs.changed.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (self.jobs.changed, self.wake)]
            await asyncio.wait(waits, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if self.wake.is_set():  # nudged: a cancel, most likely
                self.wake.clear()
                await self._refresh()
            if time.monotonic() - checked_at_s > RECHECK_S:
                await asyncio.gather(*(self._look_up_state(j) for j in self.jobs.pending()))
                checked_at_s = time.monotonic()

    async def _refresh(self) -> None:
        await self._update(lambda record: False)

    async def _cancel(self, job_id: str) -> None:
        async with self.limit:
            response = await self.r.jobs.cancel_job(
                jobs_pb2.CancelJobRequest(job_id=job_id), self.record.tenant
            )
        self.jobs.states[job_id] = response.state

    def _stopping(self) -> bool:
        return self.record.status == "cancelling"

    # ---- the record ----------------------------------------------------------------

    def _counts(self) -> tuple[int, int, int]:
        succeeded = failed = 0
        for state in self.jobs.states.values():
            succeeded += state == jobs_pb2.JOB_STATE_SUCCEEDED
            failed += state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_EXPIRED)
        bad = sum(isinstance(line, BadLine) for line in self.lines) + len(self.jobs.refused)
        return len(self.lines), succeeded, failed + bad

    async def _tick(self) -> None:
        """Write the live counts (at most every TICK_S) and renew the lease; the record
        read back also brings a cancel that came through the API."""
        now_s = time.monotonic()
        counts = self._counts()
        since_s = now_s - self._written_at_s
        if since_s < LEASE_S / 3 and (counts == self._counts_written or since_s < TICK_S):
            return

        def renew(record: BatchRecord) -> bool:
            total, completed, failed = counts
            record.request_counts.total = total
            record.request_counts.completed = completed
            record.request_counts.failed = failed
            record.lease_until_s = time.time() + LEASE_S
            return True

        await self._update(renew)
        self._counts_written, self._written_at_s = counts, now_s

    async def _update(self, change: Callable[[BatchRecord], bool]) -> None:
        lost = False

        def guarded(record: BatchRecord) -> bool:
            nonlocal lost
            lost = record.owner != self.r.runner_id or record.is_final
            return not lost and change(record)

        stored, _ = await self.r.batches.update(self.batch_id, guarded)
        if lost and not stored.record.is_final:
            raise LeaseLostError(self.batch_id)
        self.record = stored.record

    # ---- finalizing ----------------------------------------------------------------

    async def _finalize(self) -> None:
        if self._stopping():
            outcome = "cancelled"
        elif time.time() >= self.record.expires_at:
            outcome = "expired"
        else:
            outcome = "completed"

            def finalizing(record: BatchRecord) -> bool:
                record.set_status("finalizing")
                return True

            await self._update(finalizing)
        outputs, errors, usage = await self._write_lines(outcome)
        output_id = await self._write_file("output", outputs)
        error_id = await self._write_file("error", errors)
        counts = self._counts()

        def finish(record: BatchRecord) -> bool:
            record.request_counts.total, record.request_counts.completed = counts[0], counts[1]
            record.request_counts.failed = counts[2]
            record.output_file_id, record.error_file_id = output_id, error_id
            record.usage = usage
            record.set_status(outcome)  # type: ignore[arg-type]
            record.owner, record.lease_until_s = "", 0.0
            return True

        await self._update(finish)
        log.info(
            "batch finished",
            batch_id=self.batch_id,
            status=outcome,
            completed=counts[1],
            failed=counts[2],
        )

    async def _write_lines(
        self, outcome: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        results = await asyncio.gather(*(self._result(line) for line in self.lines))
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        tokens = {"input": 0, "cached": 0, "output": 0}
        unrun = "batch_expired" if outcome == "expired" else "batch_cancelled"
        for line, result in zip(self.lines, results, strict=True):
            request_id = f"{self.batch_id}-{line.number}"
            if isinstance(line, BadLine) or line.number in self.jobs.refused:
                bad = line if isinstance(line, BadLine) else self.jobs.refused[line.number]
                errors.append(_bad_line(bad, request_id))
                continue
            if result is None:  # never queued: the batch stopped first
                errors.append(batch_unrun_line(line.custom_id, request_id, unrun, _UNRUN[unrun]))
                continue
            job_id = result.job_id
            if result.state == jobs_pb2.JOB_STATE_SUCCEEDED and result.HasField("result"):
                body = self.r.render(line.endpoint, job_id, result.result, line)
                outputs.append(batch_result_line(line.custom_id, job_id, body))
                usage = result.result.usage
                tokens["input"] += usage.prompt_tokens
                tokens["cached"] += usage.cached_tokens
                tokens["output"] += usage.completion_tokens
            elif result.state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_SUCCEEDED):
                # Failed in the engine, or succeeded with a result that has expired since.
                body = error_body(result.error or "the result has expired", "server_error")
                errors.append(batch_refused_line(line.custom_id, job_id, 500, body))
            else:
                code = "batch_expired" if result.state == jobs_pb2.JOB_STATE_EXPIRED else unrun
                errors.append(batch_unrun_line(line.custom_id, job_id, code, _UNRUN[code]))
        usage_body = {
            "input_tokens": tokens["input"],
            "input_tokens_details": {"cached_tokens": tokens["cached"]},
            "output_tokens": tokens["output"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens["input"] + tokens["output"],
        }
        return outputs, errors, usage_body

    async def _result(self, line: Line) -> jobs_pb2.GetResultResponse | None:
        job_id = self.jobs.job_ids.get(line.number)
        if job_id is None:
            return None
        async with self.limit:
            return await self.r.jobs.get_result(
                jobs_pb2.GetResultRequest(job_id=job_id), self.record.tenant
            )

    async def _write_file(self, kind: str, rows: list[dict[str, Any]]) -> str | None:
        if not rows:
            return None
        # Derived from the batch: a driver that takes over writes the same file again.
        digest = hashlib.sha256(f"{self.batch_id}:{kind}".encode()).hexdigest()[:32]
        data = b"".join(msgspec.json.encode(row) + b"\n" for row in rows)
        info = await self.r.files.put(
            self.record.tenant,
            f"{self.batch_id}_{kind}.jsonl",
            "batch_output",
            data,
            file_id=f"file-{digest}",
        )
        return info.id


_UNRUN = {
    "batch_expired": "this request could not be executed before the batch expired",
    "batch_cancelled": "the batch was cancelled before this request ran",
}


def _refused(line: GoodLine, exc: InvalidArgumentError) -> BadLine:
    """SubmitJob's refusal of a line, with the fields named as the line names them."""
    violations = tuple(
        FieldViolation("body." + openai_field(v.field.removeprefix("request.")), v.description)
        for v in exc.violations
    )
    return BadLine(line.number, line.custom_id, violations)


def _bad_line(line: BadLine, request_id: str) -> dict[str, Any]:
    if line.code == "invalid_json":
        return batch_unrun_line(None, request_id, line.code, line.message, line=line.number)
    error = error_body(
        f"line {line.number}: {line.message}",
        "invalid_request_error",
        line.param,
        line.code if line.code != "invalid_request" else None,
    )
    return batch_refused_line(line.custom_id, request_id, line.status_code, error)
