"""The webhook service: completion events in, signed HTTP POSTs out, nothing lost.

Two durable JetStream consumers, both explicit-ack:

- intake (`WEBHOOKS_INTAKE` on TWOLANE_RESULTS): for each completion event whose job
  was submitted with a webhook_url, create the delivery (create-only, in the
  twolane_webhooks bucket) and its ticket (`twolane.webhooks.<job_id>` on the
  TWOLANE_WEBHOOKS work queue, Nats-Msg-Id = job id), and only then ack the event.
- delivery (`WEBHOOKS` on TWOLANE_WEBHOOKS): each ticket drives its delivery. An
  attempt is counted in the record before the request goes out and its outcome after;
  then the ticket is acked (delivered, or failed and dead-lettered) or nacked with the
  delay to the next attempt, so JetStream keeps the schedule's timers and a restarted
  service resumes where the last one stopped. A service killed mid-attempt has the
  ticket redelivered after `--webhook-ack-wait-s`; the receiver may then see the
  attempt twice, with the same webhook-id (at least once).

Consumer names are upper case: tenants' own consumers on TWOLANE_RESULTS (nats_auth.py)
are named after tenants, which are lower case, so they can never touch these.

Isolation: requests in flight per host are capped and a circuit breaker pauses failing
hosts (webhook_hosts.py); every attempt has `--webhook-timeout-s` in all. A delivery
whose host already has a full queue here goes back on the stream (for at most one
timeout) instead of taking a place in the process that another host's delivery could
use.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import httpx
import structlog
from google.protobuf import message as protobuf_message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from twolane.services import jetstream, tracing
from twolane.services.config import WebhookConfig
from twolane.services.job_store import JobStore
from twolane.services.webhook_hosts import HostGates
from twolane.services.webhook_metrics import WebhookMetrics
from twolane.services.webhook_payload import EVENT_TYPES, render_body, signed_headers, webhook_id
from twolane.services.webhook_secrets import WebhookSecrets
from twolane.services.webhook_store import (
    FINAL_STATES,
    DeliveryStore,
    StoredDelivery,
    now_timestamp,
)
from twolane.services.webhook_transport import RefusedAddressError, checked_client, post_capped
from twolane.services.webhook_urls import RefusedUrlError, UrlPolicy, origin_of, parse_url
from twolane.v1 import jobs_pb2, webhook_delivery_pb2

log = structlog.get_logger(__name__)

INTAKE_CONSUMER = "WEBHOOKS_INTAKE"
DELIVERY_CONSUMER = "WEBHOOKS"
# Tickets handled at once: waiting for their host's slot, or sending.
MAX_TICKETS_IN_FLIGHT = 1024
FETCH_BATCH = 64
FETCH_TIMEOUT_S = 1.0
# A NATS hiccup while handling a message: it comes back this soon (an event that keeps
# failing to be taken in, later and later).
BOOKKEEPING_RETRY_S = 1.0
MAX_INTAKE_RETRY_S = 60.0
ERROR_SNIPPET_CHARS = 200
# Deliveries not yet due by less than this go now.
DUE_SLACK_S = 0.01
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Outcome:
    """How one attempt went. `result` is one of webhook_metrics.ATTEMPT_RESULTS."""

    result: str
    http_status: int = 0
    error: str = ""
    # How long the request took; None when none went out.
    sent_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.result == "2xx"

    @property
    def host_healthy(self) -> bool:
        """Whether the host answered like a working server (a 4xx is the receiver's
        verdict on this delivery, not a sign that the host is down)."""
        if self.result == "2xx":
            return True
        return self.result == "http_error" and self.http_status < 500 and self.http_status != 429


def retry_delay_s(schedule_s: tuple[float, ...], num_attempts: int) -> float:
    """The wait after attempt `num_attempts` failed: its step of the schedule, drawn
    uniformly between half the step and the step (jitter spreads a burst of retries, and
    with each step at least twice the one before, gaps still grow)."""
    step_s = schedule_s[num_attempts - 1]
    return random.uniform(step_s / 2, step_s)


def new_delivery(
    event: jobs_pb2.JobEvent, url: str, tenant: str
) -> webhook_delivery_pb2.WebhookDelivery:
    return webhook_delivery_pb2.WebhookDelivery(
        job_id=event.job_id,
        tenant=tenant,
        url=url,
        body=render_body(event),
        status=jobs_pb2.WebhookStatus(
            state=jobs_pb2.WEBHOOK_STATE_PENDING, webhook_id=webhook_id(event.job_id)
        ),
        created_at=now_timestamp(),
    )


def consumers(config: WebhookConfig) -> list[tuple[str, api.ConsumerConfig]]:
    """(stream, consumer) of the intake and of the deliveries."""

    def consumer(
        name: str, description: str, filter_subject: str, max_ack_pending: int
    ) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=description,
            filter_subject=filter_subject,
            max_ack_pending=max_ack_pending,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=config.ack_wait_s,
            # Nacks that wait for a retry count as deliveries: never run out of them.
            max_deliver=-1,
        )

    intake = consumer(
        INTAKE_CONSUMER,
        "the webhook service takes in completion events",
        "twolane.results.>",
        max_ack_pending=10_000,
    )
    delivery = consumer(
        DELIVERY_CONSUMER,
        "the webhook service drives each delivery from its ticket",
        "twolane.webhooks.>",
        # Deliveries waiting for a retry hold their ticket unacked.
        max_ack_pending=1_000_000,
    )
    return [(jetstream.RESULTS_STREAM, intake), (jetstream.WEBHOOKS_STREAM, delivery)]


class WebhookDeliverer:
    """Delivers the completion events of jobs that have a webhook_url.

    Args:
        nc: a live NATS connection.
        jobs: the job records (where a job's webhook_url is).
        deliveries: the delivery records, tickets and dead letters.
        secrets: the tenants' signing secrets.
        config: schedule, timeout, SSRF rules, per-host limit, ack wait.
    """

    def __init__(
        self,
        nc: NATS,
        jobs: JobStore,
        deliveries: DeliveryStore,
        secrets: WebhookSecrets,
        config: WebhookConfig,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.jobs = jobs
        self.deliveries = deliveries
        self.secrets = secrets
        self.config = config
        self.schedule_s = config.schedule_s
        self.metrics = metrics or WebhookMetrics()
        self.hosts = HostGates(config.max_per_host, on_state=self.metrics.observe_circuit)
        self.client = checked_client(
            UrlPolicy.from_config(config), config.timeout_s, config.ca_file
        )
        self._tasks: set[asyncio.Task[None]] = set()
        # Jobs whose ticket a task here holds: a redelivery of that ticket (its heartbeat
        # came late) is left to that task, never sent a second time in parallel.
        self._in_hand: set[str] = set()
        self._room = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._subs: list[JetStreamContext.PullSubscription] = []

    # ---- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        for stream, consumer in consumers(self.config):
            await self.js.add_consumer(stream, consumer)
        intake = await self.js.pull_subscribe_bind(INTAKE_CONSUMER, jetstream.RESULTS_STREAM)
        tickets = await self.js.pull_subscribe_bind(DELIVERY_CONSUMER, jetstream.WEBHOOKS_STREAM)
        self._subs = [intake, tickets]
        self._loops = [
            asyncio.create_task(self._intake_loop(intake), name="twolane-webhook-intake"),
            asyncio.create_task(self._delivery_loop(tickets), name="twolane-webhook-delivery"),
        ]
        self.metrics.start(self.js)
        log.info(
            "webhook deliverer started",
            retry_schedule=self.config.retry_schedule,
            timeout_s=self.config.timeout_s,
            max_per_host=self.config.max_per_host,
        )

    async def stop(self, grace_s: float) -> None:
        """Stop pulling; attempts in flight get `grace_s`, the rest go back to JetStream."""
        self._stopping = True
        self._room.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.metrics.stop()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.client.aclose()
        log.info("webhook deliverer stopped")

    # ---- intake ------------------------------------------------------------------

    async def _intake_loop(self, sub: JetStreamContext.PullSubscription) -> None:
        while not self._stopping:
            msgs = await self._fetch(sub, FETCH_BATCH)
            await asyncio.gather(*(self._run_intake(msg) for msg in msgs))

    async def _run_intake(self, msg: Msg) -> None:
        """Take one event in; whatever happens, it is acked, nacked or terminated."""
        try:
            await self._take_in(msg)
        except Exception as exc:
            num_delivered = max(1, msg.metadata.num_delivered)
            retry_in_s = min(MAX_INTAKE_RETRY_S, BOOKKEEPING_RETRY_S * 2 ** (num_delivered - 1))
            log.warning(
                "webhook intake failed; retrying",
                error=repr(exc),
                subject=msg.subject,
                retry_in_s=retry_in_s,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=retry_in_s)

    async def _take_in(self, msg: Msg) -> None:
        try:
            event = jobs_pb2.JobEvent.FromString(msg.data)
        except protobuf_message.DecodeError:
            log.error("unreadable completion event terminated", subject=msg.subject)
            await msg.term()
            return
        stored_job = await self.jobs.read(event.job_id) if event.state in EVENT_TYPES else None
        url = stored_job.record.submission.webhook_url if stored_job is not None else ""
        if not url or stored_job is None:
            await msg.ack()
            return
        record = new_delivery(event, url, stored_job.record.tenant)
        if not await self.deliveries.create(record):
            # Taken in before (this event was redelivered): publish its ticket again
            # only if no ticket has claimed it yet; Nats-Msg-Id drops a second copy.
            existing = await self.deliveries.read(event.job_id)
            unclaimed = (
                existing is not None
                and existing.record.ticket_sequence == 0
                and existing.record.status.state == jobs_pb2.WEBHOOK_STATE_PENDING
            )
            if not unclaimed or existing is None:
                await msg.ack()
                return
            record = existing.record
        # In the job's trace (the event carries it): the ticket takes it on to each attempt.
        parent = tracing.context_from_headers(msg.headers)
        with tracing.tracer.start_as_current_span("webhook.intake", context=parent):
            await self.deliveries.publish_ticket(record, tracing.inject())
        await msg.ack()
        log.info("webhook queued", job_id=event.job_id, host=origin_of(url))

    # ---- deliveries --------------------------------------------------------------

    async def _delivery_loop(self, sub: JetStreamContext.PullSubscription) -> None:
        while not self._stopping:
            room = MAX_TICKETS_IN_FLIGHT - len(self._tasks)
            if room <= 0:
                self._room.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._room.wait(), FETCH_TIMEOUT_S)
                continue
            for msg in await self._fetch(sub, min(room, FETCH_BATCH)):
                task = asyncio.create_task(self._run_ticket(msg))
                self._tasks.add(task)
                task.add_done_callback(self._ticket_done)

    def _ticket_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.set()

    async def _run_ticket(self, msg: Msg) -> None:
        """Handle one ticket; whatever happens, it is acked, nacked or terminated."""
        try:
            await self._handle_ticket(msg)
        except asyncio.CancelledError:
            # Stopping: the delivery goes on in the next webhook process.
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as exc:
            log.warning("webhook ticket failed; retrying", error=repr(exc), subject=msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=BOOKKEEPING_RETRY_S)

    async def _handle_ticket(self, msg: Msg) -> None:
        try:
            job_id = webhook_delivery_pb2.WebhookTicket.FromString(msg.data).job_id
        except protobuf_message.DecodeError:
            job_id = ""
        if job_id in self._in_hand:
            # Settled by the task that holds it (or, a second ticket, once that is done).
            log.warning("webhook ticket redelivered while in hand; left to it", job_id=job_id)
            return
        self._in_hand.add(job_id)
        try:
            stored = await self.deliveries.read(job_id) if job_id else None
            if stored is None:
                log.error("webhook ticket without a delivery terminated", subject=msg.subject)
                await msg.term()
                return
            await self._drive(msg, stored)
        finally:
            self._in_hand.discard(job_id)

    async def _drive(self, msg: Msg, stored: StoredDelivery) -> None:
        record = stored.record
        if record.status.state in FINAL_STATES:
            if record.status.state == jobs_pb2.WEBHOOK_STATE_FAILED and not record.dlq_sequence:
                # Failed by a process that died before its dead letter went out.
                await self.deliveries.dead_letter(stored, record.status.last_error)
            await msg.ack()
            return
        sequence = msg.metadata.sequence.stream
        owner = record.ticket_sequence
        if owner not in (0, sequence) and await self.deliveries.ticket_on_stream(owner):
            await msg.ack()  # a second ticket for a delivery another one drives
            return
        if record.status.HasField("next_attempt_at"):
            due_in_s = record.status.next_attempt_at.ToNanoseconds() / 1e9 - time.time()
            if due_in_s > DUE_SLACK_S:
                await msg.nak(delay=due_in_s)
                return
        origin = origin_of(record.url)
        if self.hosts.is_crowded(origin):
            retry_after_s = self.hosts.retry_after_s(origin, self.config.timeout_s)
            await msg.nak(delay=random.uniform(1.0, 1.5) * retry_after_s)
            return
        async with self._holding(msg), self.hosts.slot(origin):
            await self._attempt(msg, stored, origin, owner)

    async def _attempt(self, msg: Msg, stored: StoredDelivery, origin: str, owner: int) -> None:
        sequence = msg.metadata.sequence.stream

        def start(record: webhook_delivery_pb2.WebhookDelivery) -> bool:
            if record.status.state in FINAL_STATES:
                return False
            if record.ticket_sequence not in (0, sequence, owner):
                return False
            record.ticket_sequence = sequence
            record.status.state = jobs_pb2.WEBHOOK_STATE_DELIVERING
            record.status.attempts += 1
            record.status.ClearField("next_attempt_at")
            return True

        stored, started = await self.deliveries.transition(stored.record.job_id, start, stored)
        if not started:
            await msg.ack()
            return
        parent = tracing.context_from_headers(msg.headers)
        with tracing.tracer.start_as_current_span("webhook.attempt", context=parent) as span:
            span.set_attribute("twolane.job_id", stored.record.job_id)
            span.set_attribute("twolane.webhook.host", origin)
            span.set_attribute("twolane.webhook.attempt", stored.record.status.attempts)
            paused_s, is_probe = self.hosts.admit(origin)
            if paused_s > 0:
                outcome = Outcome(
                    "paused",
                    error=f"not sent: {origin} is paused after failing repeatedly (circuit "
                    f"open, next probe in {paused_s:.0f} s)",
                )
            else:
                started_s = time.monotonic()
                outcome = await self._send(stored.record)
                self.hosts.record(origin, outcome.host_healthy, is_probe)
                self.hosts.observe_latency(origin, time.monotonic() - started_s)
            span.set_attribute("twolane.webhook.result", outcome.result)
            if outcome.http_status:
                span.set_attribute("http.response.status_code", outcome.http_status)
            if not outcome.delivered:
                tracing.record_failure(span, outcome.result)
        await self._settle(msg, stored, outcome)

    async def _send(self, record: webhook_delivery_pb2.WebhookDelivery) -> Outcome:
        timeout_s = self.config.timeout_s
        try:
            # The URL passed at submit; the rules may have changed since (a restart
            # without --webhook-allow-http). Its addresses are checked when connecting.
            parse_url(record.url, self.config.allow_http)
        except RefusedUrlError as exc:
            return Outcome("refused", error=f"refused: {exc}")
        headers = signed_headers(
            record.status.webhook_id, record.body, self.secrets.signing_secrets(record.tenant)
        )
        started_s = time.monotonic()
        try:
            status, body = await asyncio.wait_for(
                post_capped(self.client, record.url, record.body, headers), timeout_s
            )
        except RefusedAddressError as exc:
            return Outcome("refused", error=f"refused when connecting: {exc}")
        except (asyncio.TimeoutError, httpx.TimeoutException):
            outcome = Outcome("timeout", error=f"no response within {timeout_s:g} s")
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            text = str(exc).replace(record.url, origin_of(record.url))
            outcome = Outcome("connect_error", error=f"{type(exc).__name__}: {text}".strip())
        else:
            outcome = _http_outcome(status, body)
        return replace(outcome, sent_s=time.monotonic() - started_s)

    async def _settle(self, msg: Msg, stored: StoredDelivery, outcome: Outcome) -> None:
        """Record the outcome, then ack (delivered or failed) or nack until the next try."""
        self.metrics.attempted(outcome.result, outcome.sent_s)

        def conclude(record: webhook_delivery_pb2.WebhookDelivery) -> bool:
            status = record.status
            if status.state in FINAL_STATES:
                return False
            status.last_http_status = outcome.http_status
            status.last_error = outcome.error
            if outcome.delivered:
                status.state = jobs_pb2.WEBHOOK_STATE_DELIVERED
                status.delivered_at.CopyFrom(now_timestamp())
            elif outcome.http_status == 410 or status.attempts > len(self.schedule_s):
                status.state = jobs_pb2.WEBHOOK_STATE_FAILED
            else:
                due_s = time.time() + retry_delay_s(self.schedule_s, status.attempts)
                status.next_attempt_at.FromNanoseconds(int(due_s * 1e9))
            return True

        job_id = stored.record.job_id
        stored, _ = await self.deliveries.transition(job_id, conclude, stored)
        status = stored.record.status
        fields = {
            "job_id": job_id,
            "host": origin_of(stored.record.url),
            "attempt": status.attempts,
        }
        if status.state == jobs_pb2.WEBHOOK_STATE_DELIVERED:
            await msg.ack()
            self.metrics.ended("delivered")
            log.info("webhook delivered", http_status=status.last_http_status, **fields)
        elif status.state == jobs_pb2.WEBHOOK_STATE_FAILED:
            reason = _failure_reason(status)
            await self.deliveries.dead_letter(stored, reason)
            await msg.ack()
            self.metrics.ended("failed")
            log.error("webhook failed; dead-lettered", reason=reason, **fields)
        else:
            retry_in_s = max(0.0, status.next_attempt_at.ToNanoseconds() / 1e9 - time.time())
            await msg.nak(delay=retry_in_s)
            log.warning(
                "webhook attempt failed; retrying",
                error=status.last_error,
                retry_in_s=round(retry_in_s, 3),
                **fields,
            )

    # ---- plumbing ----------------------------------------------------------------

    async def _fetch(self, sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
        try:
            return await sub.fetch(batch, timeout=FETCH_TIMEOUT_S)
        # nats.py raises its own TimeoutError or, on some paths, the builtin one.
        except TimeoutError:
            return []
        except Exception as exc:  # NATS is away or restarting: keep trying
            log.warning("webhook fetch failed", error=repr(exc))
            await asyncio.sleep(BOOKKEEPING_RETRY_S)
            return []

    @contextlib.asynccontextmanager
    async def _holding(self, msg: Msg) -> AsyncIterator[None]:
        """Keep the ticket ours while it waits for its host and while it is sent."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.config.ack_wait_s / 3)
                with contextlib.suppress(Exception):
                    await msg.in_progress()

        heartbeat = asyncio.create_task(beat())
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat


def _http_outcome(status: int, body: bytes) -> Outcome:
    if 200 <= status < 300:
        return Outcome("2xx", status)
    if status == 410:
        error = "HTTP 410 Gone: the receiver wants no more deliveries to this URL"
    elif 300 <= status < 400:
        error = f"HTTP {status}: redirects are not followed"
    else:
        snippet = _CONTROL_CHARS.sub(" ", body[:ERROR_SNIPPET_CHARS].decode(errors="replace"))
        error = f"HTTP {status}" + (f": {snippet.strip()}" if snippet.strip() else "")
    return Outcome("http_error", status, error)


def _failure_reason(status: jobs_pb2.WebhookStatus) -> str:
    if status.last_http_status == 410:
        return status.last_error
    return f"gave up after {status.attempts} attempts; the last: {status.last_error}"
