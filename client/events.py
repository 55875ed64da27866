"""Completion events from NATS for `wait()`: `twolane.results.<tenant>.<job_id>`.

One NATS connection per client, made on the first wait and kept (it reconnects by
itself). When NATS cannot be reached, `subscribe` returns None and the caller polls;
the next attempt to connect comes `RECONNECT_AFTER_S` later, so that a client without
NATS does not pay a connect timeout on every wait. `watch` reads events only (no gRPC):
the stored one by a direct get on the results stream, which a tenant's NATS user may
do for its own subjects, else the next one published.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from twolane.client.config import DEFAULT_TENANT, ClientConfig
from twolane.client.errors import EventsUnreachable
from twolane.v1 import jobs_pb2

RECONNECT_AFTER_S = 30.0
RESULTS_STREAM = "TWOLANE_RESULTS"  # where the server keeps every completion event


class EventsLost(Exception):
    """The NATS connection closed while listening: the caller polls instead."""


def result_subject(tenant: str, job_id: str) -> str:
    return f"twolane.results.{tenant}.{job_id}"


class JobEvents:
    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._nc: NATS | None = None
        self._unreachable_until_s = 0.0
        self._unreachable_reason = ""
        self._lock = asyncio.Lock()

    async def subscribe(self, job_id: str) -> EventSubscription | None:
        """A subscription to the job's completion subject, live at the server when this
        returns; None when NATS cannot be reached (or is not to be used)."""
        if not self._config.wait_on_events:
            return None
        nc = await self._connection()
        if nc is None:
            return None
        subject = result_subject(self._config.resolved_tenant(), job_id)
        try:
            sub = await nc.subscribe(subject, max_msgs=1)
            # The server has the subscription once it answered a ping: an event from
            # now on reaches us.
            await nc.flush(timeout=math.ceil(self._config.nats_connect_timeout_s))
        except (nats.errors.Error, OSError, asyncio.TimeoutError):
            return None
        return EventSubscription(sub)

    async def watch(self, job_id: str, timeout_s: float | None) -> jobs_pb2.JobEvent | None:
        """The job's completion event: the stored one if it is out, else the next one
        within `timeout_s` (None: wait for ever); None when none came in time.

        Raises:
            EventsUnreachable: no NATS URL, or NATS cannot be reached or refused us.
        """
        url = self._config.resolved_nats_url()
        if not url:
            raise EventsUnreachable("no NATS URL: set nats_url, or data_dir of the server")
        nc = await self._connection()
        if nc is None:
            raise EventsUnreachable(f"cannot reach NATS at {url}: {self._unreachable_reason}")
        subject = result_subject(self._config.resolved_tenant(), job_id)
        wait_s = math.ceil(self._config.nats_connect_timeout_s)
        try:
            # Subscribed before looking back, so an event published in between arrives.
            sub = await nc.subscribe(subject, max_msgs=1)
            await nc.flush(timeout=wait_s)
            subscription = EventSubscription(sub)
            # Closed however this ends, the stored event included: a long-lived client
            # must not keep one subscription per job it watched.
            try:
                try:
                    stored = await nc.jetstream().get_last_msg(RESULTS_STREAM, subject, direct=True)
                    # nats-py gives an empty payload as None.
                    return jobs_pb2.JobEvent.FromString(stored.data or b"")
                except nats.js.errors.NotFoundError:
                    pass
                return await subscription.next_event(
                    365 * 24 * 3600.0 if timeout_s is None else timeout_s
                )
            finally:
                await subscription.close()
        except (nats.errors.Error, OSError, asyncio.TimeoutError, EventsLost) as exc:
            # A permissions violation shows as no reply: name the likely cause.
            raise EventsUnreachable(
                f"NATS at {url} did not answer for {subject} ({exc or type(exc).__name__}); "
                "are the NATS credentials this tenant's?"
            ) from None

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    async def _connection(self) -> NATS | None:
        async with self._lock:
            if self._nc is not None and not self._nc.is_closed:
                return self._nc
            if time.monotonic() < self._unreachable_until_s:
                return None
            url = self._config.resolved_nats_url()
            self._nc = await self._connect(url) if url else None
            if self._nc is None:
                self._unreachable_until_s = time.monotonic() + RECONNECT_AFTER_S
            return self._nc

    async def _connect(self, url: str) -> NATS | None:
        user, password = self._config.nats_user() or (None, None)
        tenant = self._config.resolved_tenant()
        # A tenant's NATS user may receive replies only under its own inbox prefix.
        inbox = "_INBOX" if tenant == DEFAULT_TENANT else f"_INBOX_{tenant}"
        timeout_s = self._config.nats_connect_timeout_s

        async def quiet(exc: Exception) -> None:
            """nats-py logs every error of a reconnecting connection otherwise."""

        try:
            # Without the outer timeout nats-py would keep trying an absent server.
            return await asyncio.wait_for(
                nats.connect(
                    url,
                    name="twolane-client",
                    user=user,
                    password=password,
                    inbox_prefix=inbox,
                    connect_timeout=timeout_s,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=quiet,
                ),
                timeout_s,
            )
        except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
            self._unreachable_reason = str(exc) or type(exc).__name__
            return None


class EventSubscription:
    """One job's completion subject."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    async def next_event(self, timeout_s: float) -> jobs_pb2.JobEvent | None:
        """The event, or None when none came within `timeout_s`.

        Raises:
            EventsLost: the connection is closed for good.
        """
        try:
            msg = await self._sub.next_msg(timeout=timeout_s)
        except TimeoutError:  # nats.py's own is a subclass
            return None
        except nats.errors.ConnectionClosedError as exc:
            raise EventsLost(str(exc)) from exc
        return jobs_pb2.JobEvent.FromString(msg.data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # gone already: it ended after one message
            await self._sub.unsubscribe()
