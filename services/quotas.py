"""Per-tenant quotas in a front: requests per minute, tokens per minute, concurrency.

Rates are token buckets that refill continuously (a limit of 60 per minute allows a
burst of 60, then one a second). Tokens are reserved when a request is admitted (its
prompt plus `max_tokens`) and settled when it finishes (what it really used is kept,
the rest given back). Concurrency counts what the engine core holds for the tenant,
interactive streams and running jobs alike, from the load the core publishes after every
step, plus what this process has sent since.

With several fronts (`--api-server-count N`) each enforces 1/N of a tenant's rate
limits, so that together they enforce the limit without talking to each other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from twolane.services.errors import RateLimitedError
from twolane.services.keys import Limits, Principal


@dataclass
class _Bucket:
    capacity: float
    refill_per_s: float
    level: float
    updated_s: float

    def refill(self, now_s: float) -> None:
        self.level = min(self.capacity, self.level + (now_s - self.updated_s) * self.refill_per_s)
        self.updated_s = now_s

    def wait_s(self, amount: float) -> float:
        """How long until `amount` fits (inf if it never will)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.refill_per_s)


@dataclass
class _TenantState:
    limits: Limits
    requests: _Bucket | None
    tokens: _Bucket | None
    num_pending: int = 0  # sent to the core, not yet seen there (no output yet)


@dataclass
class Reservation:
    """Tokens held for one admitted request until it finishes."""

    _quotas: TenantQuotas
    tenant: str
    num_tokens: int
    concurrent: bool
    _started: bool = field(default=False)
    _settled: bool = field(default=False)

    def started(self) -> None:
        """The engine core has the request (its first output came): from now on the core's
        published load counts it."""
        if self.concurrent and not self._started:
            self._started = True
            self._quotas._started(self.tenant)

    def settle(self, num_tokens_used: int | None = None) -> None:
        """The request finished (or failed): give back the tokens it did not use."""
        if self._settled:
            return
        self._settled = True
        self.started()
        used = self.num_tokens if num_tokens_used is None else min(num_tokens_used, self.num_tokens)
        self._quotas._release(self.tenant, self.num_tokens - used)


class TenantQuotas:
    """The quota state of one process.

    Args:
        share: this process's share of each rate limit (1 / the number of fronts).
        held_by_core: how many requests the engine core holds for a tenant (from its
            published load); None when the core's load is not known.
    """

    def __init__(
        self, share: float = 1.0, held_by_core: Callable[[str], int | None] | None = None
    ) -> None:
        self._share = share
        self._held_by_core = held_by_core or (lambda tenant: None)
        self._tenants: dict[str, _TenantState] = {}

    @property
    def share(self) -> float:
        """This process's share of each rate limit."""
        return self._share

    def admit(self, principal: Principal, num_tokens: int, concurrent: bool = True) -> Reservation:
        """Count one request of `num_tokens` (prompt + max_tokens) against the tenant.

        Args:
            concurrent: the request will be held by the engine core now (an interactive
                call), so it counts against the concurrency limit too.

        Raises:
            RateLimitedError: over a limit, with when to retry.
        """
        now_s = time.monotonic()
        state = self._state(principal, now_s)
        limits = state.limits
        waits: list[tuple[float, str]] = []
        if state.requests is not None:
            state.requests.refill(now_s)
            waits.append((state.requests.wait_s(1), "requests per minute"))
        if state.tokens is not None:
            state.tokens.refill(now_s)
            wait_s = state.tokens.wait_s(num_tokens)
            if math.isinf(wait_s):
                raise RateLimitedError(
                    f"the request needs {num_tokens} tokens; tenant {principal.tenant!r} may "
                    f"use {int(state.tokens.capacity)} per minute here",
                    retry_after_s=60.0,
                )
            waits.append((wait_s, "tokens per minute"))
        if concurrent and limits.max_concurrent:
            held = self._held_by_core(principal.tenant)
            in_flight = (held or 0) + state.num_pending
            if in_flight >= limits.max_concurrent:
                waits.append((1.0, f"{limits.max_concurrent} concurrent requests"))
        wait_s, reason = max(waits, default=(0.0, ""))
        if wait_s > 0:
            raise RateLimitedError(
                f"tenant {principal.tenant!r} is over its limit of {reason}; retry later",
                retry_after_s=wait_s,
            )
        if state.requests is not None:
            state.requests.level -= 1
        if state.tokens is not None:
            state.tokens.level -= num_tokens
        if concurrent:
            state.num_pending += 1
        return Reservation(self, principal.tenant, num_tokens if state.tokens else 0, concurrent)

    def _started(self, tenant: str) -> None:
        state = self._tenants.get(tenant)
        if state is not None and state.num_pending > 0:
            state.num_pending -= 1

    def _release(self, tenant: str, num_tokens: int) -> None:
        state = self._tenants.get(tenant)
        if state is not None and state.tokens is not None and num_tokens > 0:
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + num_tokens)

    def _state(self, principal: Principal, now_s: float) -> _TenantState:
        state = self._tenants.get(principal.tenant)
        if state is None or state.limits != principal.limits:
            state = _TenantState(
                principal.limits,
                self._bucket(principal.limits.requests_per_minute, now_s),
                self._bucket(principal.limits.tokens_per_minute, now_s),
            )
            self._tenants[principal.tenant] = state
        return state

    def _bucket(self, per_minute: int, now_s: float) -> _Bucket | None:
        if per_minute <= 0:
            return None
        capacity = max(1.0, per_minute * self._share)
        return _Bucket(capacity, capacity / 60.0, capacity, now_s)
