"""Isolation between receivers: a limit of requests in flight per host, and a circuit
breaker per host.

Hosts are origins (`scheme://host:port`). A host gets at most `max_in_flight` requests
at once, and at most as many more deliveries wait for it here; past that a delivery is
put back on the queue until about when a slot should be free (from the host's recent
latency), so a slow or dead host holds a bounded share of the deliverer and never the
rest of it, while a fast one still gets its deliveries back in time to fill its slots.

The breaker counts a host's failures in a row (no response, a timeout, 5xx, 429). After
`failure_threshold` of them it opens: the host is paused, and attempts due meanwhile fail
at once without a request. After `cooldown_s` it is half-open: one probe goes out; a
success closes the breaker, a failure opens it again for twice as long (up to
`max_cooldown_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

FAILURE_THRESHOLD = 5
COOLDOWN_S = 30.0
MAX_COOLDOWN_S = 600.0
# Closed, idle hosts beyond this many are forgotten.
MAX_IDLE_HOSTS = 10_000
# A host's latency before it has answered anything, and how fast the estimate follows.
FIRST_LATENCY_S = 1.0
LATENCY_WEIGHT = 0.2
MIN_RETRY_AFTER_S = 0.05


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class Breaker:
    failure_threshold: int = FAILURE_THRESHOLD
    cooldown_s: float = COOLDOWN_S
    max_cooldown_s: float = MAX_COOLDOWN_S
    state: CircuitState = CircuitState.CLOSED
    num_failures: int = 0
    opened_at_s: float = 0.0
    probing: bool = False
    _pause_s: float = 0.0

    def admit(self, now_s: float) -> tuple[float, bool]:
        """(0, is_probe) when an attempt may go now; else (how long the host stays
        paused, False). In the half-open state the first caller sends the probe."""
        if self.state is CircuitState.OPEN:
            remaining_s = self.opened_at_s + self._pause_s - now_s
            if remaining_s > 0:
                return remaining_s, False
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN:
            if self.probing:
                return self._pause_s, False
            self.probing = True
            return 0.0, True
        return 0.0, False

    def record(self, healthy: bool, now_s: float, was_probe: bool) -> None:
        """The outcome of an attempt that was sent. Requests already in flight when the
        breaker opened may still fail; only the probe's failure opens it again."""
        if healthy:
            self.state, self.num_failures, self._pause_s = CircuitState.CLOSED, 0, 0.0
            self.probing = False
            return
        self.num_failures += 1
        if was_probe:
            self._open(now_s, min(self.max_cooldown_s, 2 * self._pause_s))
        elif self.state is CircuitState.CLOSED and self.num_failures >= self.failure_threshold:
            self._open(now_s, self.cooldown_s)

    def _open(self, now_s: float, pause_s: float) -> None:
        self.state, self.opened_at_s, self._pause_s, self.probing = (
            CircuitState.OPEN,
            now_s,
            pause_s,
            False,
        )


@dataclass
class Host:
    origin: str
    slots: asyncio.Semaphore
    breaker: Breaker
    num_waiting: int = 0
    num_in_flight: int = 0
    latency_s: float = FIRST_LATENCY_S


@dataclass
class HostGates:
    """Every host the deliverer has talked to lately."""

    max_in_flight: int
    on_state: Callable[[str, CircuitState], None] = lambda origin, state: None
    clock: Callable[[], float] = time.monotonic
    failure_threshold: int = FAILURE_THRESHOLD
    cooldown_s: float = COOLDOWN_S
    _hosts: dict[str, Host] = field(default_factory=dict)

    def host(self, origin: str) -> Host:
        host = self._hosts.get(origin)
        if host is None:
            if len(self._hosts) >= MAX_IDLE_HOSTS:
                self._forget_idle()
            breaker = Breaker(self.failure_threshold, self.cooldown_s)
            host = Host(origin, asyncio.Semaphore(self.max_in_flight), breaker)
            self._hosts[origin] = host
        return host

    def is_crowded(self, origin: str) -> bool:
        """Whether as many deliveries wait for the host as it may have in flight."""
        return self.host(origin).num_waiting >= self.max_in_flight

    def retry_after_s(self, origin: str, max_s: float) -> float:
        """When a delivery turned away from a crowded host should come back: about when
        the deliveries ahead of it will have had their turn (at most `max_s`)."""
        host = self.host(origin)
        backlog = host.num_waiting + host.num_in_flight
        wait_s = host.latency_s * backlog / self.max_in_flight
        return min(max_s, max(MIN_RETRY_AFTER_S, wait_s))

    def observe_latency(self, origin: str, seconds: float) -> None:
        host = self.host(origin)
        host.latency_s += LATENCY_WEIGHT * (seconds - host.latency_s)

    @contextlib.asynccontextmanager
    async def slot(self, origin: str) -> AsyncIterator[Host]:
        """Wait for one of the host's request slots."""
        host = self.host(origin)
        host.num_waiting += 1
        try:
            await host.slots.acquire()
        finally:
            host.num_waiting -= 1
        host.num_in_flight += 1
        try:
            yield host
        finally:
            host.num_in_flight -= 1
            host.slots.release()

    def admit(self, origin: str) -> tuple[float, bool]:
        """See `Breaker.admit`."""
        breaker = self.host(origin).breaker
        before = breaker.state
        verdict = breaker.admit(self.clock())
        self._notify(origin, before, breaker.state)
        return verdict

    def record(self, origin: str, healthy: bool, was_probe: bool) -> None:
        breaker = self.host(origin).breaker
        before = breaker.state
        breaker.record(healthy, self.clock(), was_probe)
        self._notify(origin, before, breaker.state)

    def _notify(self, origin: str, before: CircuitState, after: CircuitState) -> None:
        if before is not after:
            self.on_state(origin, after)

    def _forget_idle(self) -> None:
        for origin, host in list(self._hosts.items()):
            idle = host.num_waiting == 0 and host.num_in_flight == 0
            if idle and host.breaker.state is CircuitState.CLOSED:
                del self._hosts[origin]
