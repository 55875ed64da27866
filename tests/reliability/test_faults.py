"""Faults under a 500-job run: the engine core and the job runner SIGKILLed every few
seconds, nats-server restarted, a node of a 3-node NATS cluster (R3 streams and buckets)
killed and brought back, a gateway killed mid-submission and started again. Each run
ends with every job succeeded exactly once (one result written, one completion event)
with the tokens of an undisturbed run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from integration.nats_fixtures import EventRecorder, NatsServer, free_port, start_process
from integration.serving import ServerProcess, start_server

from .conftest import Report
from .harness import (
    JobRun,
    NatsCluster,
    Outcome,
    child_pids,
    kill,
    outcome,
    results_written,
)

NUM_JOBS = 500
KILL_EVERY_S = 3.0
SHORT_ACK_WAIT = {"TWOLANE_JOB_ACK_WAIT_S": "10"}


async def when_done(
    events: EventRecorder, run: JobRun, share: float, timeout_s: float = 120
) -> None:
    """Wait until `share` of the run's jobs have published their completion event."""
    give_up_at = time.monotonic() + timeout_s
    while len({e.job_id for e in events.events} & set(run.job_ids.values())) < share * NUM_JOBS:
        if time.monotonic() > give_up_at:
            pytest.fail(f"fewer than {share:.0%} of the jobs finished")
        await asyncio.sleep(0.1)


async def faulted_run(
    address: str,
    nats_url: str,
    events: EventRecorder,
    reference: list[list[int]],
    inject: Callable[[JobRun], Awaitable[int]],
) -> tuple[Outcome, int]:
    """Submit NUM_JOBS jobs, inject faults while they run, wait for all of them and check
    them; the outcome and how many faults were injected."""
    results_before = await results_written(nats_url)
    run = JobRun(NUM_JOBS)
    submitting = asyncio.ensure_future(run.submit(address))
    num_faults = await inject(run)
    await submitting
    results = await run.wait(address, events=events, timeout_s=400)
    return await outcome(run, results, reference, nats_url, results_before, events), num_faults


def record(report: Report, scenario: str, checked: Outcome, num_faults: int) -> None:
    print(f"{scenario}: {num_faults} faults, {checked}")
    report.add(
        "faults",
        runs=1,
        injected=num_faults,
        jobs=checked.num_jobs,
        lost=checked.num_lost,
        duplicated=checked.num_duplicated,
        wrong=checked.num_wrong,
        seen_twice=checked.num_seen_twice,
    )
    report.record(f"faults_{scenario}", injected=num_faults, **checked.__dict__)


@pytest.mark.slow
@pytest.mark.soak
async def test_the_engine_core_and_the_job_runner_killed_every_few_seconds(
    report: Report, job_reference: list[list[int]]
) -> None:
    server = start_server("--log-json", env=SHORT_ACK_WAIT)
    try:
        nats_url = (server.data_dir / "nats.url").read_text().strip()
        events = await EventRecorder().start(nats_url)

        async def kill_in_turn(run: JobRun) -> int:
            await when_done(events, run, 0.05)
            for number, role in enumerate(("engine-core", "jobs", "engine-core", "jobs")):
                if number:
                    await asyncio.sleep(KILL_EVERY_S)
                kill(child_pids(server, role)[-1])
            return 4

        checked, num_faults = await faulted_run(
            server.address, nats_url, events, job_reference, kill_in_turn
        )
        await events.close()
    finally:
        server.stop()
    record(report, "kills", checked, num_faults)
    checked.assert_clean()


@pytest.mark.slow
@pytest.mark.soak
async def test_nats_server_restarted_mid_run(
    tmp_path: Path, report: Report, job_reference: list[list[int]]
) -> None:
    nats_server = NatsServer(tmp_path / "nats").start()
    server = start_server("--nats-url", nats_server.url, env=SHORT_ACK_WAIT)
    try:
        events = await EventRecorder().start(nats_server.url)

        async def restart_nats(run: JobRun) -> int:
            await when_done(events, run, 0.3)
            await asyncio.to_thread(nats_server.restart)
            return 1

        checked, num_faults = await faulted_run(
            server.address, nats_server.url, events, job_reference, restart_nats
        )
        await events.close()
    finally:
        server.stop()
        nats_server.stop()
    record(report, "nats_restart", checked, num_faults)
    checked.assert_clean()


@pytest.mark.slow
@pytest.mark.soak
async def test_a_node_of_a_three_node_cluster_killed_and_brought_back(
    tmp_path: Path, report: Report, job_reference: list[list[int]]
) -> None:
    cluster = NatsCluster(tmp_path / "cluster").start()
    server: ServerProcess | None = None
    try:
        await cluster.wait_ready()
        server = start_server("--nats-url", cluster.url, "--nats-replicas", "3", env=SHORT_ACK_WAIT)
        # A plain subscriber on a node that stays up sees every event.
        events = await EventRecorder().start(cluster.nodes[2].url)

        async def kill_a_node(run: JobRun) -> int:
            await when_done(events, run, 0.3)
            cluster.kill(0)
            await asyncio.sleep(KILL_EVERY_S)
            await asyncio.to_thread(cluster.start_node, 0)
            return 1

        checked, num_faults = await faulted_run(
            server.address, cluster.url, events, job_reference, kill_a_node
        )
        await events.close()
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
    record(report, "cluster_node", checked, num_faults)
    # An event whose stream leader died before acking it is published again after the ack
    # wait; the stream dedupes it (Nats-Msg-Id), a core subscriber cannot be spared it.
    checked.assert_clean(subscribers_may_see_twice=True)


@pytest.mark.slow
@pytest.mark.soak
async def test_a_gateway_restarted_under_load(
    tmp_path: Path, report: Report, job_reference: list[list[int]]
) -> None:
    nats_server = NatsServer(tmp_path / "nats").start()
    worker_port = free_port()
    gateway_port = free_port()
    nats_args = ("--nats-url", nats_server.url)
    worker_env = {**SHORT_ACK_WAIT, "TWOLANE_DATA_DIR": str(tmp_path / "worker")}
    worker = start_process("worker", "--port", str(worker_port), *nats_args, env=worker_env)
    gateway_args = ("gateway", "--port", str(gateway_port), *nats_args)
    gateway_args += ("--worker", f"127.0.0.1:{worker_port}")
    gateways = [start_process(*gateway_args)]
    try:
        events = await EventRecorder().start(nats_server.url)

        async def restart_gateway(run: JobRun) -> int:
            while len(run.job_ids) < NUM_JOBS // 3:  # mid-submission
                await asyncio.sleep(0.05)
            kill(gateways[-1].proc.pid)
            await asyncio.to_thread(gateways[-1].proc.wait)
            gateways.append(await asyncio.to_thread(start_process, *gateway_args))
            return 1

        checked, num_faults = await faulted_run(
            gateways[0].address,
            nats_server.url,
            events,
            job_reference,
            restart_gateway,
        )
        await events.close()
    finally:
        for gateway in gateways:
            gateway.stop()
        worker.stop()
        nats_server.stop()
    record(report, "gateway_restart", checked, num_faults)
    checked.assert_clean()
