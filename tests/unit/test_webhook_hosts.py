"""Per-host isolation: the circuit breaker's states, and the cap on requests in flight."""

from __future__ import annotations

import asyncio

from twolane.services.webhook_hosts import Breaker, CircuitState, HostGates


def test_the_breaker_opens_after_failures_in_a_row_and_probes_after_the_cooldown() -> None:
    breaker = Breaker(failure_threshold=3, cooldown_s=10.0)
    for _ in range(2):
        assert breaker.admit(0.0) == (0.0, False)
        breaker.record(False, 0.0, was_probe=False)
    assert breaker.state is CircuitState.CLOSED
    breaker.record(False, 1.0, was_probe=False)
    assert breaker.state is CircuitState.OPEN
    paused_s, _ = breaker.admit(5.0)
    assert paused_s == 6.0  # opened at t=1 for 10 s
    assert breaker.admit(11.0) == (0.0, True)  # the probe
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.admit(11.5)[0] > 0  # one probe at a time
    breaker.record(True, 12.0, was_probe=True)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.admit(12.0) == (0.0, False)


def test_a_failed_probe_pauses_the_host_twice_as_long() -> None:
    breaker = Breaker(failure_threshold=1, cooldown_s=10.0)
    breaker.record(False, 0.0, was_probe=False)
    assert breaker.admit(10.0) == (0.0, True)
    breaker.record(False, 10.0, was_probe=True)
    assert breaker.state is CircuitState.OPEN
    assert breaker.admit(29.0)[0] == 1.0  # open for 20 s from t=10
    assert breaker.admit(30.0) == (0.0, True)


def test_late_failures_of_requests_sent_before_the_breaker_opened_do_not_extend_it() -> None:
    breaker = Breaker(failure_threshold=2, cooldown_s=10.0)
    breaker.record(False, 0.0, was_probe=False)
    breaker.record(False, 0.0, was_probe=False)
    for _ in range(5):
        breaker.record(False, 4.0, was_probe=False)
    assert breaker.admit(10.0) == (0.0, True)


def test_a_4xx_is_not_counted_against_the_host() -> None:
    # The deliverer records a 4xx (but 429) as healthy: the host answered.
    breaker = Breaker(failure_threshold=2)
    breaker.record(False, 0.0, was_probe=False)
    breaker.record(True, 0.0, was_probe=False)
    breaker.record(False, 0.0, was_probe=False)
    assert breaker.state is CircuitState.CLOSED


async def test_a_host_gets_at_most_its_slots_and_is_crowded_once_as_many_wait() -> None:
    changes: list[tuple[str, CircuitState]] = []
    gates = HostGates(max_in_flight=2, on_state=lambda o, s: changes.append((o, s)))
    held = asyncio.Event()
    in_flight: list[int] = []

    async def use() -> None:
        async with gates.slot("https://a:443") as host:
            in_flight.append(host.num_in_flight)
            await held.wait()

    tasks = [asyncio.create_task(use()) for _ in range(4)]
    await asyncio.sleep(0.01)
    assert max(in_flight) == 2 and len(in_flight) == 2
    assert gates.is_crowded("https://a:443")
    assert not gates.is_crowded("https://b:443")  # another host is not held up
    held.set()
    await asyncio.gather(*tasks)
    assert len(in_flight) == 4 and max(in_flight) == 2

    for _ in range(5):
        gates.record("https://a:443", healthy=False, was_probe=False)
    assert changes == [("https://a:443", CircuitState.OPEN)]
