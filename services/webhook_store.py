"""Webhook deliveries on JetStream: the records, their tickets and their dead letters.

A delivery is a `WebhookDelivery` in the twolane_webhooks KV bucket, keyed by job id:
created once (create-only) when the job's completion event comes in, then changed only
by revision-checked updates, so two writers never both win. It moves

    PENDING -> DELIVERING (attempts made, next one scheduled) -> DELIVERED | FAILED

and `redeliver` takes a DELIVERED or FAILED one back to PENDING for a new round. A
ticket on `twolane.webhooks.<job_id>` (stream TWOLANE_WEBHOOKS, a work queue) drives
each round; a failed delivery also leaves a `WebhookDeadLetter` on twolane.dlq.webhooks
until it is redelivered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import nats.js.errors
from google.protobuf import message as protobuf_message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from twolane.services import jetstream
from twolane.services.errors import FailedPreconditionError, NotFoundError, UnavailableError
from twolane.services.webhook_payload import webhook_id
from twolane.services.webhook_urls import origin_of
from twolane.v1 import jobs_pb2, webhook_delivery_pb2

FINAL_STATES = frozenset({jobs_pb2.WEBHOOK_STATE_DELIVERED, jobs_pb2.WEBHOOK_STATE_FAILED})
_MAX_UPDATE_TRIES = 16


def webhook_state_name(state: jobs_pb2.WebhookState.ValueType) -> str:
    return jobs_pb2.WebhookState.Name(state).removeprefix("WEBHOOK_STATE_")


@dataclass
class StoredDelivery:
    """A delivery with the KV revision it was read at."""

    record: webhook_delivery_pb2.WebhookDelivery
    revision: int


def now_timestamp() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def ticket_msg_id(job_id: str, num_round: int) -> str:
    """One ticket per round: a repeated publish within the duplicate window is dropped."""
    return job_id if num_round == 0 else f"{job_id}.{num_round}"


class DeliveryStore:
    def __init__(self, js: JetStreamContext, bucket: KeyValue) -> None:
        self.js = js
        self.bucket = bucket

    async def read(self, job_id: str) -> StoredDelivery | None:
        """The job's delivery; None if there is none (or it is unreadable)."""
        try:
            entry = await self.bucket.get(job_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        assert entry.value is not None and entry.revision is not None
        try:
            record = webhook_delivery_pb2.WebhookDelivery.FromString(entry.value)
        except protobuf_message.DecodeError:
            return None
        return StoredDelivery(record, entry.revision)

    async def create(self, record: webhook_delivery_pb2.WebhookDelivery) -> bool:
        """False when the job already has a delivery (its event came in before)."""
        try:
            await self.bucket.create(record.job_id, record.SerializeToString())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def transition(
        self,
        job_id: str,
        change: Callable[[webhook_delivery_pb2.WebhookDelivery], bool],
        just_read: StoredDelivery | None = None,
    ) -> tuple[StoredDelivery, bool]:
        """Apply `change` to the latest record with a revision check, retrying on races.

        `change` edits the record in place and returns False to leave it as it is.
        Returns the record as it now stands and whether `change` was written.
        `just_read`, a record the caller read a moment ago, saves a round trip.

        Raises:
            NotFoundError: no delivery for the job.
        """
        stored, from_caller = just_read, just_read is not None
        for _ in range(_MAX_UPDATE_TRIES):
            if stored is None:
                stored = await self.read(job_id)
            if stored is None:
                raise NotFoundError(f"no webhook delivery for job {job_id!r}")
            record = webhook_delivery_pb2.WebhookDelivery()
            record.CopyFrom(stored.record)
            if not change(record):
                if from_caller:  # decided on a copy that may be stale: decide again
                    stored, from_caller = None, False
                    continue
                return stored, False
            try:
                revision = await self.bucket.update(
                    job_id, record.SerializeToString(), last=stored.revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                stored = None
                continue
            return StoredDelivery(record, revision), True
        raise UnavailableError(f"the webhook delivery of job {job_id} changes too often")

    async def publish_ticket(
        self,
        record: webhook_delivery_pb2.WebhookDelivery,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The ticket that drives the delivery; `headers` (the trace context) go with it,
        so every attempt is a span in the job's trace."""
        ticket = webhook_delivery_pb2.WebhookTicket(job_id=record.job_id)
        await self.js.publish(
            jetstream.webhook_subject(record.job_id),
            ticket.SerializeToString(),
            stream=jetstream.WEBHOOKS_STREAM,
            headers={
                **(headers or {}),
                jetstream.MSG_ID_HEADER: ticket_msg_id(record.job_id, record.round),
            },
        )

    async def ticket_on_stream(self, sequence: int) -> bool:
        """Whether the ticket at `sequence` is still on the work queue (not yet acked)."""
        try:
            await self.js.get_msg(jetstream.WEBHOOKS_STREAM, sequence)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def dead_letter(self, stored: StoredDelivery, reason: str) -> StoredDelivery:
        """Put a FAILED delivery on twolane.dlq.webhooks (once per round) and note where."""
        record = stored.record
        status = record.status
        letter = webhook_delivery_pb2.WebhookDeadLetter(
            job_id=record.job_id,
            tenant=record.tenant,
            reason=reason,
            attempts=status.attempts,
            last_http_status=status.last_http_status,
            failed_at=now_timestamp(),
            origin=origin_of(record.url),
        )
        ack = await self.js.publish(
            jetstream.WEBHOOKS_DLQ_SUBJECT,
            letter.SerializeToString(),
            stream=jetstream.DLQ_STREAM,
            headers={jetstream.MSG_ID_HEADER: ticket_msg_id(record.job_id, record.round)},
        )

        def note(current: webhook_delivery_pb2.WebhookDelivery) -> bool:
            if current.status.state != jobs_pb2.WEBHOOK_STATE_FAILED or current.dlq_sequence:
                return False
            current.dlq_sequence = ack.seq
            return True

        stored, _ = await self.transition(record.job_id, note, just_read=stored)
        return stored

    async def redeliver(self, job_id: str) -> StoredDelivery:
        """Start a delivered or failed delivery again: attempts from 0, a new ticket, and
        its dead letter (if any) off the DLQ. The webhook-id stays the same.

        Raises:
            NotFoundError: no delivery for the job (no webhook_url, or not finished).
            FailedPreconditionError: the delivery is still in progress.
        """
        stored = await self.read(job_id)
        if stored is None:
            raise NotFoundError(f"no webhook delivery for job {job_id!r}")
        if stored.record.status.state not in FINAL_STATES:
            state = webhook_state_name(stored.record.status.state)
            raise FailedPreconditionError(f"the delivery of job {job_id} is {state}")
        old_dlq_sequence = stored.record.dlq_sequence

        def restart(record: webhook_delivery_pb2.WebhookDelivery) -> bool:
            if record.status.state not in FINAL_STATES:
                return False
            record.round += 1
            record.ticket_sequence = 0
            record.dlq_sequence = 0
            record.status.state = jobs_pb2.WEBHOOK_STATE_PENDING
            record.status.attempts = 0
            record.status.ClearField("next_attempt_at")
            record.status.ClearField("delivered_at")
            return True

        stored, restarted = await self.transition(job_id, restart, just_read=stored)
        if not restarted:
            state = webhook_state_name(stored.record.status.state)
            raise FailedPreconditionError(f"the delivery of job {job_id} is {state}")
        await self.publish_ticket(stored.record)
        if old_dlq_sequence:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_msg(jetstream.DLQ_STREAM, old_dlq_sequence)
        return stored


async def webhook_status(bucket: KeyValue, job_id: str) -> jobs_pb2.WebhookStatus:
    """GetResult's view of a job's delivery: PENDING until its record exists."""
    try:
        entry = await bucket.get(job_id)
    except nats.js.errors.KeyNotFoundError:
        return jobs_pb2.WebhookStatus(
            state=jobs_pb2.WEBHOOK_STATE_PENDING, webhook_id=webhook_id(job_id)
        )
    assert entry.value is not None
    return webhook_delivery_pb2.WebhookDelivery.FromString(entry.value).status
