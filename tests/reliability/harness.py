"""What the reliability suite's runs share: batches of jobs checked for loss, duplicates and
wrong results; the pids of `twolane serve`'s children; a NATS cluster on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import nats
import pytest
from integration.nats_fixtures import FINAL_STATES, EventRecorder, free_port
from integration.serving import ServerProcess

from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import SamplingParams
from twolane.services.nats_embedded import nats_server_binary
from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

RESULTS_STREAM = "TWOLANE_RESULTS"
RESULTS_KV_STREAM = "KV_twolane_results"
TIERS = (jobs_pb2.JOB_TIER_URGENT, jobs_pb2.JOB_TIER_STANDARD, jobs_pb2.JOB_TIER_BULK)
# How often jobs whose completion event was not seen are asked for with GetResult.
EVENTLESS_POLL_S = 10.0
# Worth retrying: the server (or its NATS) is away or full for a moment.
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def job_prompt(index: int) -> list[int]:
    """Token ids of the built-in model's vocabulary, different for every job."""
    return [(7 * index + 13 * k) % 250 + 1 for k in range(4 + index % 13)]


def job_max_tokens(index: int) -> int:
    return 4 + index % 9


def reference_tokens(num_jobs: int, max_tokens: int | None = None) -> list[list[int]]:
    """Each job's greedy tokens from an undisturbed in-process engine on the same weights
    (`max_tokens` each, or harness.job_max_tokens)."""
    core = EngineCore(EngineConfig(model="builtin", num_blocks=2048))
    tokens: list[list[int]] = [[] for _ in range(num_jobs)]
    by_length: dict[int, list[int]] = {}
    for index in range(num_jobs):
        by_length.setdefault(max_tokens or job_max_tokens(index), []).append(index)
    for max_tokens, indices in by_length.items():
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        for index, out in zip(
            indices, core.generate([job_prompt(i) for i in indices], params), strict=True
        ):
            tokens[index] = out
    return tokens


@dataclass
class JobRun:
    """`num_jobs` jobs submitted once each (retried with one idempotency key per job)."""

    num_jobs: int
    max_tokens: int | None = None  # each job's; None: harness.job_max_tokens
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    job_ids: dict[int, str] = field(default_factory=dict)
    num_submit_retries: int = 0

    def request(self, index: int) -> jobs_pb2.SubmitJobRequest:
        return jobs_pb2.SubmitJobRequest(
            request=generate_pb2.GenerateRequest(
                prompt_token_ids=job_prompt(index),
                params=generate_pb2.SamplingParams(
                    max_tokens=self.max_tokens or job_max_tokens(index), ignore_eos=True
                ),
            ),
            tier=TIERS[index % len(TIERS)],
            idempotency_key=f"{self.run_id}-{index}",
            custom_id=f"job-{index}",
        )

    async def submit(self, address: str, concurrency: int = 16, timeout_s: float = 300) -> None:
        """Submit every job, retrying what the server could not take for now."""
        give_up_at = time.monotonic() + timeout_s
        pending = asyncio.Queue[int]()
        for index in range(self.num_jobs):
            pending.put_nowait(index)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def submitter() -> None:
                while not pending.empty():
                    index = pending.get_nowait()
                    delay_s = 0.05
                    while True:
                        try:
                            reply = await stub.SubmitJob(self.request(index), timeout=10)
                            break
                        except grpc.aio.AioRpcError as err:
                            if err.code() not in (*RETRIED, grpc.StatusCode.DEADLINE_EXCEEDED):
                                raise
                            if time.monotonic() > give_up_at:
                                raise
                            self.num_submit_retries += 1
                            await asyncio.sleep(delay_s * random.uniform(0.5, 1.5))
                            delay_s = min(2.0, delay_s * 2)
                    self.job_ids[index] = reply.job_id

            await asyncio.gather(*(submitter() for _ in range(concurrency)))

    async def wait(
        self, address: str, events: EventRecorder | None = None, timeout_s: float = 300
    ) -> dict[int, jobs_pb2.GetResultResponse]:
        """Every job's final GetResult (fails the test past `timeout_s`).

        With `events`, a job counts as done once its completion event is seen; GetResult
        is asked only now and then, for jobs whose event a plain subscriber missed.
        """
        results: dict[int, jobs_pb2.GetResultResponse] = {}
        give_up_at = time.monotonic() + timeout_s
        next_poll_s = time.monotonic() + EVENTLESS_POLL_S
        while True:
            missing = [i for i in self.job_ids if i not in results]
            if not missing:
                return results
            due = missing
            if events is not None and time.monotonic() < next_poll_s:
                seen = Counter(e.job_id for e in events.events)
                due = [i for i in missing if seen[self.job_ids[i]]]
            elif events is not None:
                next_poll_s = time.monotonic() + EVENTLESS_POLL_S
            if due:
                results.update(await self.get_results(address, due))
            if time.monotonic() > give_up_at:
                pytest.fail(f"{len(missing)} jobs never finished")
            await asyncio.sleep(0.25)

    async def get_results(
        self, address: str, indices: list[int], concurrency: int = 16
    ) -> dict[int, jobs_pb2.GetResultResponse]:
        """GetResult of the jobs that have finished, among `indices`."""
        found: dict[int, jobs_pb2.GetResultResponse] = {}
        queue = list(indices)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def ask() -> None:
                while queue:
                    index = queue.pop()
                    request = jobs_pb2.GetResultRequest(job_id=self.job_ids[index])
                    try:
                        reply = await stub.GetResult(request, timeout=10)
                    except grpc.aio.AioRpcError as err:
                        if err.code() not in (*RETRIED, grpc.StatusCode.DEADLINE_EXCEEDED):
                            raise
                        continue
                    if reply.state in FINAL_STATES:
                        found[index] = reply

            await asyncio.gather(*(ask() for _ in range(concurrency)))
        return found


@dataclass(frozen=True)
class Outcome:
    """How a run ended, job by job."""

    num_jobs: int
    num_succeeded: int
    num_lost: int  # never succeeded
    num_duplicated: int  # stored more than one event, or more than one result written
    num_wrong: int  # a result other than the undisturbed run's
    num_seen_twice: int = 0  # a plain NATS subscriber got the same job's event twice

    def assert_clean(self, subscribers_may_see_twice: bool = False) -> None:
        """Nothing lost, duplicated or wrong. `subscribers_may_see_twice` where a
        publisher cannot learn whether the stream stored an event (its node died before
        the ack) and publishes it again: the stream keeps one, a plain subscriber got both."""
        assert (self.num_lost, self.num_duplicated, self.num_wrong) == (0, 0, 0), self
        if not subscribers_may_see_twice:
            assert self.num_seen_twice == 0, self


async def results_written(nats_url: str) -> int:
    """How many results the results bucket has taken so far (create-only: one per job)."""
    nc = await nats.connect(nats_url.split(","))
    try:
        return int((await nc.jetstream().stream_info(RESULTS_KV_STREAM)).state.last_seq)
    finally:
        await nc.close()


async def stored_events(nats_url: str) -> Counter[str]:
    """Completion events kept in TWOLANE_RESULTS, by job id."""
    nc = await nats.connect(nats_url.split(","))
    try:
        info = await nc.jetstream().stream_info(RESULTS_STREAM, subjects_filter="twolane.results.>")
    finally:
        await nc.close()
    return Counter(
        {subject.rsplit(".", 1)[-1]: n for subject, n in (info.state.subjects or {}).items()}
    )


async def outcome(
    run: JobRun,
    results: dict[int, jobs_pb2.GetResultResponse],
    reference: list[list[int]],
    nats_url: str,
    results_before: int,
    events: EventRecorder | None = None,
) -> Outcome:
    """Check a finished run: every job succeeded once, with the undisturbed run's tokens.

    `events` (a plain subscriber) may miss events while its NATS node is down, so only
    seeing one twice counts there; the results stream keeps every event published.
    """
    await asyncio.sleep(1.0)  # let the last events reach the plain subscriber
    stored = await stored_events(nats_url)
    num_written = await results_written(nats_url) - results_before
    succeeded = lost = duplicated = wrong = seen_twice = 0
    for index, job_id in run.job_ids.items():
        result = results.get(index)
        if result is None or result.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            lost += 1
            continue
        succeeded += 1
        if stored[job_id] != 1:
            duplicated += 1
        if events is not None and events.count(job_id) > 1:
            seen_twice += 1
        if list(result.result.token_ids) != reference[index]:
            wrong += 1
    lost += run.num_jobs - len(run.job_ids)
    duplicated += max(0, num_written - run.num_jobs)
    return Outcome(run.num_jobs, succeeded, lost, duplicated, wrong, seen_twice)


# ---- processes ---------------------------------------------------------------------------


def logged(server: ServerProcess, event: str) -> list[dict]:
    """Entries of a `--log-json` server's log with this event."""
    entries = []
    for line in list(server.lines):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if entry.get("event") == event:
                    entries.append(entry)
    return entries


def child_pids(server: ServerProcess, role: str) -> list[int]:
    """Pids of the supervisor's children of `role`, in start order."""
    return [int(e["pid"]) for e in logged(server, "child started") if e.get("role") == role]


def logged_at_s(entry: dict) -> float:
    """A JSON log entry's time, as seconds since the epoch."""
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---- a NATS cluster ------------------------------------------------------------------------


@dataclass
class NatsNode:
    name: str
    store_dir: Path
    port: int
    cluster_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class NatsCluster:
    """Three nats-servers with JetStream, routed to each other on loopback."""

    root: Path
    size: int = 3
    nodes: list[NatsNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self) -> NatsCluster:
        self.nodes = [
            NatsNode(f"node-{i}", self.root / f"node-{i}", free_port(), free_port())
            for i in range(self.size)
        ]
        for index in range(self.size):
            self.start_node(index)
        return self

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        routes = ",".join(
            f"nats://127.0.0.1:{other.cluster_port}" for other in self.nodes if other is not node
        )
        node.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-js",
                "-sd",
                str(node.store_dir),
                "-n",
                node.name,
                "-a",
                "127.0.0.1",
                "-p",
                str(node.port),
                "--cluster_name",
                "twolane",
                "--cluster",
                f"nats://127.0.0.1:{node.cluster_port}",
                "--routes",
                routes,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        give_up_at = time.monotonic() + 30
        while time.monotonic() < give_up_at:
            try:
                socket.create_connection(("127.0.0.1", node.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"{node.name} did not start")

    async def wait_ready(self, timeout_s: float = 60) -> None:
        """Until the cluster can create an R3 stream (its JetStream leaders are elected)."""
        from nats.js import api

        give_up_at = time.monotonic() + timeout_s
        nc = await nats.connect([node.url for node in self.nodes])
        try:
            js = nc.jetstream()
            while True:
                try:
                    await js.add_stream(
                        api.StreamConfig(name="READY", subjects=["ready.>"], num_replicas=3)
                    )
                    await js.delete_stream("READY")
                    return
                except Exception:
                    if time.monotonic() > give_up_at:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await nc.close()

    def kill(self, index: int) -> None:
        proc = self.nodes[index].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
                try:
                    node.proc.wait(15)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
