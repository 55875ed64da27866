"""The batch lane's JetStream layout: streams, consumers and KV buckets.

Everything is declared here with explicit settings and created idempotently at
start-up by every process that uses it (serve, gateway, worker): a missing
stream is added, one with other settings is updated to these.

Streams and buckets have `--nats-replicas` replicas (1 by default, 3 on a cluster).

- TWOLANE_JOBS (stream, `twolane.jobs.>`): work-queue retention, file storage,
  discard new at max_msgs/max_bytes (so a full queue refuses SubmitJob), 2 min
  duplicate window on Nats-Msg-Id = job id.
- twolane-jobs-<tier> (durable pull consumers, one per tier): explicit ack,
  ack_wait from the config, unlimited deliveries (the worker dead-letters a job
  past `max_deliver`); workers pull urgent, then standard, then bulk.
- TWOLANE_RESULTS (stream, `twolane.results.>`): completion events, limits
  retention, file, max_age = result TTL, duplicate window min(1 h, TTL).
- TWOLANE_DLQ (stream, `twolane.dlq.>`): dead letters, max_age = job TTL.
- TWOLANE_WEBHOOKS (stream, `twolane.webhooks.>`): one ticket per webhook delivery
  in progress, work-queue retention, max_age = job TTL (see webhook_deliverer.py).
- KV twolane_jobs (job id -> JobRecord), twolane_results (job id -> result),
  twolane_idempotency (hash of tenant and key -> job id), twolane_webhooks (job id
  -> WebhookDelivery): history 1, file, TTL = job TTL, result TTL, job TTL, job TTL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from twolane.services.config import JobsConfig

JOBS_STREAM = "TWOLANE_JOBS"
RESULTS_STREAM = "TWOLANE_RESULTS"
DLQ_STREAM = "TWOLANE_DLQ"
JOBS_BUCKET = "twolane_jobs"
RESULTS_BUCKET = "twolane_results"
IDEMPOTENCY_BUCKET = "twolane_idempotency"
WEBHOOKS_STREAM = "TWOLANE_WEBHOOKS"
WEBHOOKS_BUCKET = "twolane_webhooks"
WEBHOOKS_DLQ_SUBJECT = "twolane.dlq.webhooks"

TIERS = ("urgent", "standard", "bulk")  # the order workers pull in
DEFAULT_TENANT = "default"
JOBS_DUPLICATE_WINDOW_S = 120.0
RESULTS_DUPLICATE_WINDOW_S = 3600.0
MSG_ID_HEADER = "Nats-Msg-Id"
# Core NATS (not JetStream): tells the worker running a job that it was cancelled.
CANCEL_SUBJECT_PREFIX = "twolane.control.cancel"

_STREAM_NAME_IN_USE = 10058


Lane = tuple[str, str]  # (tier, tenant): one pull consumer of TWOLANE_JOBS


def job_subject(tier: str, tenant: str = DEFAULT_TENANT) -> str:
    """`twolane.jobs.<tier>`, and `twolane.jobs.<tier>.<tenant>` for other tenants than
    the default: each tenant's jobs have consumers of their own, so that workers can take
    turns across tenants instead of draining one tenant's backlog first."""
    return f"twolane.jobs.{tier}" if tenant == DEFAULT_TENANT else f"twolane.jobs.{tier}.{tenant}"


def lane_of_subject(subject: str) -> Lane | None:
    parts = subject.split(".")
    if len(parts) not in (3, 4) or parts[:2] != ["twolane", "jobs"] or parts[2] not in TIERS:
        return None
    return (parts[2], parts[3] if len(parts) == 4 else DEFAULT_TENANT)


def result_subject(tenant: str, job_id: str) -> str:
    return f"twolane.results.{tenant}.{job_id}"


def dlq_subject(tier: str) -> str:
    return f"twolane.dlq.{tier}"


def webhook_subject(job_id: str) -> str:
    return f"twolane.webhooks.{job_id}"


@dataclass(frozen=True)
class DeadLetterCounts:
    jobs: int  # on twolane.dlq.<tier>
    webhooks: int  # on twolane.dlq.webhooks


async def dead_letter_counts(js: JetStreamContext) -> DeadLetterCounts:
    """The dead letters of jobs and of webhook deliveries, which share TWOLANE_DLQ."""
    info = await js.stream_info(DLQ_STREAM, subjects_filter=WEBHOOKS_DLQ_SUBJECT)
    webhooks = (info.state.subjects or {}).get(WEBHOOKS_DLQ_SUBJECT, 0)
    return DeadLetterCounts(jobs=info.state.messages - webhooks, webhooks=webhooks)


def cancel_subject(job_id: str) -> str:
    return f"{CANCEL_SUBJECT_PREFIX}.{job_id}"


def consumer_name(tier: str, tenant: str = DEFAULT_TENANT) -> str:
    base = f"twolane-jobs-{tier}"
    return base if tenant == DEFAULT_TENANT else f"{base}-{tenant}"


def lane_of_consumer(name: str) -> Lane | None:
    for tier in TIERS:
        base = consumer_name(tier)
        if name == base:
            return (tier, DEFAULT_TENANT)
        if name.startswith(base + "-"):
            return (tier, name[len(base) + 1 :])
    return None


def idempotency_key_hash(tenant: str, key: str) -> str:
    """KV keys allow few characters; a hash also keeps tenants apart."""
    return hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()


@dataclass(frozen=True)
class Buckets:
    jobs: KeyValue
    results: KeyValue
    idempotency: KeyValue
    webhooks: KeyValue


def streams(config: JobsConfig) -> list[api.StreamConfig]:
    return [
        api.StreamConfig(
            name=JOBS_STREAM,
            description="queued batch jobs, one ticket per job",
            subjects=["twolane.jobs.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.NEW,
            max_msgs=config.max_queued_jobs,
            max_bytes=config.max_queued_bytes,
            duplicate_window=JOBS_DUPLICATE_WINDOW_S,
            num_replicas=config.nats_replicas,
        ),
        api.StreamConfig(
            name=RESULTS_STREAM,
            description="job completion events, kept for late subscribers",
            subjects=["twolane.results.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=config.result_ttl_s,
            duplicate_window=min(RESULTS_DUPLICATE_WINDOW_S, config.result_ttl_s),
            # Direct gets by subject: how a tenant reads its own events (see nats_auth.py).
            allow_direct=True,
            num_replicas=config.nats_replicas,
        ),
        api.StreamConfig(
            name=DLQ_STREAM,
            description="jobs that failed on every delivery, with the reason",
            subjects=["twolane.dlq.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=config.record_ttl_s,
            duplicate_window=JOBS_DUPLICATE_WINDOW_S,
            num_replicas=config.nats_replicas,
        ),
        api.StreamConfig(
            name=WEBHOOKS_STREAM,
            description="webhook deliveries in progress, one ticket per delivery",
            subjects=["twolane.webhooks.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=config.record_ttl_s,
            duplicate_window=JOBS_DUPLICATE_WINDOW_S,
            num_replicas=config.nats_replicas,
        ),
    ]


def consumer(config: JobsConfig, tier: str, tenant: str = DEFAULT_TENANT) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        name=consumer_name(tier, tenant),
        durable_name=consumer_name(tier, tenant),
        description=f"workers pull {tier} jobs of tenant {tenant}",
        filter_subject=job_subject(tier, tenant),
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait_s,
        # Unlimited: the worker counts deliveries against config.max_deliver (job_worker.py).
        max_deliver=-1,
        # Pulls come in small batches sized to the engine's free room.
        max_waiting=512,
    )


def bucket(name: str, ttl_s: float, description: str, num_replicas: int) -> api.StreamConfig:
    """A KV bucket's stream, as nats.py's create_key_value lays it out."""
    return api.StreamConfig(
        name=f"KV_{name}",
        description=description,
        subjects=[f"$KV.{name}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.NEW,
        max_msgs_per_subject=1,
        max_age=ttl_s,
        duplicate_window=min(JOBS_DUPLICATE_WINDOW_S, ttl_s),
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        num_replicas=num_replicas,
    )


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            raise
        await js.update_stream(config)


async def ensure_tenant_consumers(js: JetStreamContext, config: JobsConfig, tenant: str) -> None:
    """The job consumers of a tenant (idempotent: add_consumer updates an existing one)."""
    for tier in TIERS:
        await js.add_consumer(JOBS_STREAM, consumer(config, tier, tenant))


async def ensure_layout(js: JetStreamContext, config: JobsConfig) -> Buckets:
    """Create or update every stream, consumer and bucket; returns the buckets."""
    for stream in streams(config):
        await ensure_stream(js, stream)
    for tier in TIERS:
        # add_consumer with a durable name creates it or updates its settings.
        await js.add_consumer(JOBS_STREAM, consumer(config, tier))
    layout = (
        (JOBS_BUCKET, config.record_ttl_s, "job records by job id"),
        (RESULTS_BUCKET, config.result_ttl_s, "job results by job id"),
        (IDEMPOTENCY_BUCKET, config.record_ttl_s, "job ids by tenant and idempotency key"),
        (WEBHOOKS_BUCKET, config.record_ttl_s, "webhook deliveries by job id"),
    )
    for name, ttl_s, description in layout:
        await ensure_stream(js, bucket(name, ttl_s, description, config.nats_replicas))
    return Buckets(
        jobs=await js.key_value(JOBS_BUCKET),
        results=await js.key_value(RESULTS_BUCKET),
        idempotency=await js.key_value(IDEMPOTENCY_BUCKET),
        webhooks=await js.key_value(WEBHOOKS_BUCKET),
    )
