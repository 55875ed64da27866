"""When a failed call is tried again, and how long the client waits first.

Only UNAVAILABLE (server down, restarting, draining) and RESOURCE_EXHAUSTED (a quota or
a full queue) are retried: every other status is an answer that trying again would not
change. The wait before retry n (from 0) is drawn uniformly from
[0, min(max_backoff_s, initial_backoff_s * multiplier**n)] ("full jitter"), so that
clients failing together do not come back together; when the server sent a RetryInfo
delay, the client waits that long plus the same jitter. A retry that would land past
the call's deadline is not made: the caller gets the error at once.

A retry budget per client (gRPC's retry throttling, A6) keeps a fleet of clients from
multiplying an outage: a token bucket of `budget_max_tokens` loses one token per
retryable failure and regains `budget_token_ratio` per success, and retries are made
only while more than half of it is left. Against a server that is down, each client's
retries stop after about `budget_max_tokens / 2` failures, and every later call makes
one attempt until calls succeed again.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from twolane.client.errors import TwolaneError

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """How one client retries; `RetryPolicy(max_attempts=1)` never retries."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0
    budget_max_tokens: float = 10.0
    budget_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                "need 0 <= initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier}")
        if self.budget_max_tokens <= 0 or not 0 < self.budget_token_ratio <= 1:
            raise ValueError("need budget_max_tokens > 0 and 0 < budget_token_ratio <= 1")

    def backoff_cap_s(self, retry_index: int) -> float:
        """The longest wait before retry `retry_index` (0 for the first retry)."""
        exponent = min(retry_index, 64)  # past this the cap is max_backoff_s anyway
        return min(self.max_backoff_s, self.initial_backoff_s * self.backoff_multiplier**exponent)


@dataclass(frozen=True)
class RetryEvent:
    """Told to `ClientConfig.on_retry` before the client sleeps and tries again."""

    method: str
    attempt: int  # the attempt that failed, from 1
    error: TwolaneError
    delay_s: float


@dataclass
class ClientStats:
    """Counters of one client, for metrics and tests."""

    num_calls: int = 0
    num_attempts: int = 0
    num_retries: int = 0
    # Retries the budget refused: the error went to the caller at once.
    num_retries_throttled: int = 0


class RetryBudget:
    """gRPC's retry throttling: a token bucket that failures drain and successes refill."""

    def __init__(self, max_tokens: float, token_ratio: float) -> None:
        self._max_tokens = max_tokens
        self._token_ratio = token_ratio
        self._tokens = max_tokens

    @property
    def tokens(self) -> float:
        return self._tokens

    def record_failure(self) -> None:
        self._tokens = max(0.0, self._tokens - 1)

    def record_success(self) -> None:
        self._tokens = min(self._max_tokens, self._tokens + self._token_ratio)

    def allows_retry(self) -> bool:
        return self._tokens > self._max_tokens / 2


class Retrier:
    """Decides, after each failed attempt, whether to retry and after how long."""

    def __init__(
        self,
        policy: RetryPolicy,
        stats: ClientStats | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.stats = stats or ClientStats()
        self.budget = RetryBudget(policy.budget_max_tokens, policy.budget_token_ratio)
        self._on_retry = on_retry
        self._rng = rng or random.Random()

    def succeeded(self) -> None:
        self.budget.record_success()

    def delay_s(
        self, method: str, attempt: int, error: TwolaneError, remaining_s: float | None
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to raise `error` now.

        Args:
            attempt: the attempt that just failed, from 1.
            remaining_s: what is left of the call's deadline (None: no deadline).
        """
        if error.code not in RETRYABLE_CODES:
            return None
        self.budget.record_failure()
        if attempt >= self.policy.max_attempts:
            return None
        if not self.budget.allows_retry():
            self.stats.num_retries_throttled += 1
            return None
        delay_s = self._rng.uniform(0.0, self.policy.backoff_cap_s(attempt - 1))
        if error.retry_after_s is not None:
            delay_s += error.retry_after_s
        if remaining_s is not None and delay_s >= remaining_s:
            return None
        self.stats.num_retries += 1
        if self._on_retry is not None:
            self._on_retry(RetryEvent(method, attempt, error, delay_s))
        return delay_s
