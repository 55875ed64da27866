"""Drain: a worker given SIGTERM mid-run stops pulling, finishes or gives back its jobs within
the grace period and exits 0; another worker runs what was given back, nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from integration.nats_fixtures import EventRecorder, NatsServer
from integration.serving import start_server

from .conftest import Report, soak_or
from .harness import JobRun, logged, outcome, reference_tokens, results_written

NUM_JOBS = soak_or(120, 24)
MAX_TOKENS = soak_or(400, 200)  # long enough that some jobs outlast the grace period
GRACE_PERIOD_S = 3


@pytest.mark.slow
async def test_a_worker_given_sigterm_mid_run_drains_and_loses_nothing(
    tmp_path: Path, report: Report
) -> None:
    reference = reference_tokens(NUM_JOBS, MAX_TOKENS)
    nats_server = NatsServer(tmp_path / "nats").start()
    args = ("--nats-url", nats_server.url, "--log-json", "--grace-period", str(GRACE_PERIOD_S))
    first = start_server(*args)
    second = None
    try:
        events = await EventRecorder().start(nats_server.url)
        results_before = await results_written(nats_server.url)
        run = JobRun(NUM_JOBS, max_tokens=MAX_TOKENS)
        await run.submit(first.address)
        while not logged(first, "job started"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # jobs are mid-run
        first.proc.terminate()
        exit_code = await asyncio.to_thread(first.proc.wait, GRACE_PERIOD_S + 60)
        num_started_before = len(logged(first, "job started"))
        second = start_server(*args)
        results = await run.wait(second.address, events=events, timeout_s=300)
        checked = await outcome(run, results, reference, nats_server.url, results_before, events)
        await events.close()
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        nats_server.stop()
    report.record(
        "drain",
        jobs=NUM_JOBS,
        started_by_the_drained_worker=num_started_before,
        exit_code=exit_code,
        lost=checked.num_lost,
        duplicated=checked.num_duplicated,
    )
    assert exit_code == 0
    assert logged(first, "job worker draining") and logged(first, "job worker stopped")
    checked.assert_clean()
