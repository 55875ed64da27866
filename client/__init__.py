"""A Python client for twolane servers: `Client` (blocking) and `AsyncClient` (asyncio).

    from twolane.client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.generate("Once upon a time", max_tokens=32).text)

Both clients have the same methods: `generate`, `stream`, `chat`, `get_stats` on the
interactive lane; `submit`, `result`, `cancel`, `wait`, `submit_and_wait` and `batch` on
the batch lane, and `watch` (a job's completion event, from NATS alone). Calls have
deadlines, are retried on UNAVAILABLE and RESOURCE_EXHAUSTED only (with backoff, full
jitter, the server's RetryInfo and a retry budget), carry an `x-request-id` and the
current trace context, and fail with the typed errors below.
The package needs neither torch nor the server's code.
"""

from twolane.client.aio import AsyncClient
from twolane.client.batch import BatchInput, BatchItem, BatchProgress
from twolane.client.config import ClientConfig
from twolane.client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    EventsUnreachable,
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    TwolaneError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    WaitTimeout,
)
from twolane.client.requests import Message, Prompt, Sampling, Tier
from twolane.client.retry import ClientStats, RetryEvent, RetryPolicy
from twolane.client.stream import AsyncTextStream
from twolane.client.sync import Client, TextStream

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncTextStream",
    "BatchInput",
    "BatchItem",
    "BatchProgress",
    "Cancelled",
    "Client",
    "ClientConfig",
    "ClientStats",
    "DeadlineExceeded",
    "EventsUnreachable",
    "FailedPrecondition",
    "FieldViolation",
    "InternalError",
    "InvalidArgument",
    "Message",
    "NotFound",
    "PermissionDenied",
    "Prompt",
    "RateLimited",
    "RetryEvent",
    "RetryPolicy",
    "Sampling",
    "TextStream",
    "Tier",
    "TwolaneError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WaitTimeout",
]
