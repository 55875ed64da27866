"""Tenants on a real server with `--api-keys`: authentication, isolation of jobs and of
NATS results, quotas, fair turns in the batch lane, and what the logs keep."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import nats.errors
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from twolane.services import nats_auth
from twolane.services.keys import KeysFile, Limits
from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .nats_fixtures import job_request, wait_for_states
from .serving import TWOLANE, ServerProcess, start_server

SECRET_PROMPT = "the-zebra-sings-at-midnight-7731"


@dataclass
class Tenants:
    server: ServerProcess
    keys_file: Path
    keys: dict[str, str]  # tenant -> key

    @property
    def data_dir(self) -> Path:
        assert self.server.data_dir is not None
        return self.server.data_dir

    @property
    def nats_url(self) -> str:
        return (self.data_dir / "nats.url").read_text().strip()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    created = {
        "alpha": KeysFile(keys_file).create("alpha", Limits())[0],
        "beta": KeysFile(keys_file).create("beta", Limits())[0],
        "slow": KeysFile(keys_file).create("slow", Limits(requests_per_minute=3))[0],
    }
    server = start_server(
        "--api-keys", str(keys_file), "--log-json", env={"TWOLANE_JOB_MAX_BATCH_INFLIGHT": "4"}
    )
    yield Tenants(server, keys_file, created)
    server.stop()


@pytest.fixture
async def channel(tenants: Tenants) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(tenants.server.address) as channel:
        yield channel


def as_tenant(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def short_request(prompt: str = "hi") -> generate_pb2.GenerateRequest:
    params = generate_pb2.SamplingParams(max_tokens=3, ignore_eos=True)
    return generate_pb2.GenerateRequest(prompt=prompt, params=params)


async def status_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_no_key_a_bad_key_and_an_unknown_key_are_refused_alike(
    tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    unknown = "tl_" + "A" * 43
    answers = [
        await status_of(stub.Generate(short_request())),
        await status_of(stub.Generate(short_request(), metadata=(("authorization", "x"),))),
        await status_of(stub.Generate(short_request(), metadata=as_tenant("tl_short"))),
        await status_of(stub.Generate(short_request(), metadata=as_tenant(unknown))),
        await status_of(stub.SubmitJob(job_request("x"), metadata=as_tenant(unknown))),
    ]
    assert {a.code() for a in answers} == {grpc.StatusCode.UNAUTHENTICATED}
    assert len({a.details() for a in answers}) == 1
    # Health stays open, and a good key is served.
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    ok = await stub.Generate(short_request(), metadata=as_tenant(tenants.keys["alpha"]))
    assert len(ok.token_ids) == 3


async def test_a_key_revoked_while_the_server_runs_stops_working(
    tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    key, record = KeysFile(tenants.keys_file).create("alpha", Limits())
    for _ in range(100):  # the server picks up the new key within seconds
        try:
            await stub.Generate(short_request(), metadata=as_tenant(key))
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    KeysFile(tenants.keys_file).revoke(record.key_id)
    for _ in range(100):
        try:
            await stub.Generate(short_request(), metadata=as_tenant(key))
        except grpc.aio.AioRpcError as err:
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED
            return
        await asyncio.sleep(0.1)
    pytest.fail("a revoked key still worked after 10 s")


async def test_one_tenant_cannot_see_or_cancel_anothers_job(
    tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    alpha, beta = as_tenant(tenants.keys["alpha"]), as_tenant(tenants.keys["beta"])
    job_id = (await stub.SubmitJob(job_request("alpha's"), metadata=alpha)).job_id
    for call in (
        stub.GetResult(jobs_pb2.GetResultRequest(job_id=job_id), metadata=beta),
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=beta),
    ):
        err = await status_of(call)
        assert err.code() is grpc.StatusCode.NOT_FOUND
    unknown = await status_of(
        stub.GetResult(jobs_pb2.GetResultRequest(job_id="0" * 32), metadata=beta)
    )
    assert unknown.code() is grpc.StatusCode.NOT_FOUND
    assert err.details().replace(job_id, "<id>") == unknown.details().replace("0" * 32, "<id>")
    # Untouched: it completes for its owner.
    for _ in range(600):
        result = await stub.GetResult(jobs_pb2.GetResultRequest(job_id=job_id), metadata=alpha)
        if result.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            break
        await asyncio.sleep(0.05)
    assert result.state == jobs_pb2.JOB_STATE_SUCCEEDED
    # The same idempotency key under two tenants makes two jobs.
    first = await stub.SubmitJob(job_request("k", idempotency_key="shared"), metadata=alpha)
    second = await stub.SubmitJob(job_request("k", idempotency_key="shared"), metadata=beta)
    assert first.job_id != second.job_id


async def test_a_tenants_nats_credentials_reach_its_own_results_only(
    tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    user, password = nats_auth.tenant_credentials(tenants.data_dir, "beta")
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        tenants.nats_url,
        user=user,
        password=password,
        error_cb=on_error,
        inbox_prefix="_INBOX_beta",
    )
    try:
        events: list[jobs_pb2.JobEvent] = []

        async def record(msg: nats.aio.msg.Msg) -> None:
            events.append(jobs_pb2.JobEvent.FromString(msg.data))

        await nc.subscribe("twolane.results.beta.>", cb=record)
        await nc.subscribe("twolane.results.alpha.>")
        await nc.subscribe("twolane.jobs.>")
        await nc.flush()
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        job_id = (
            await stub.SubmitJob(job_request("beta's"), metadata=as_tenant(tenants.keys["beta"]))
        ).job_id
        for _ in range(600):
            if job_id in {e.job_id for e in events}:
                break
            await asyncio.sleep(0.05)
        assert job_id in {e.job_id for e in events}
        assert {e.tenant for e in events} == {"beta"}
        denied = [str(e) for e in errors if "ermissions" in str(e)]
        assert any("twolane.results.alpha" in e for e in denied), errors
        assert any("twolane.jobs" in e for e in denied), errors
        # The stream too: its own event by subject, never another tenant's.
        js = nc.jetstream()
        own = await js.get_last_msg(
            "TWOLANE_RESULTS", f"twolane.results.beta.{job_id}", direct=True
        )
        assert jobs_pb2.JobEvent.FromString(own.data).job_id == job_id
        with pytest.raises(Exception):  # noqa: B017 - a permissions violation: no reply comes
            await js.get_last_msg("TWOLANE_RESULTS", "twolane.results.alpha.x", direct=True)
    finally:
        await nc.close()


async def test_a_tenant_over_its_request_rate_waits_while_others_are_served(
    tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    slow = as_tenant(tenants.keys["slow"])
    for _ in range(3):
        await stub.Generate(short_request(), metadata=slow)
    err = await status_of(stub.Generate(short_request(), metadata=slow))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.ToNanoseconds() > 0
    ok = await stub.Generate(short_request(), metadata=as_tenant(tenants.keys["beta"]))
    assert len(ok.token_ids) == 3


@pytest.mark.slow
async def test_a_tenants_backlog_does_not_hold_back_another_tenants_job(
    tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    alpha, beta = as_tenant(tenants.keys["alpha"]), as_tenant(tenants.keys["beta"])
    limit = asyncio.Semaphore(32)

    async def submit(i: int) -> str:
        async with limit:
            request = job_request(f"backlog {i}", max_tokens=8, tier=jobs_pb2.JOB_TIER_BULK)
            return (await stub.SubmitJob(request, metadata=alpha)).job_id

    backlog = await asyncio.gather(*(submit(i) for i in range(2000)))
    submitted_at_ns = time.time_ns()
    request = job_request("beta's one", max_tokens=8, tier=jobs_pb2.JOB_TIER_BULK)
    beta_job = (await stub.SubmitJob(request, metadata=beta)).job_id
    result = (await wait_for_states(stub, [beta_job], timeout_s=120, metadata=beta))[beta_job]
    assert result.state == jobs_pb2.JOB_STATE_SUCCEEDED
    finished_at_ns = result.finished_at.ToNanoseconds()
    results = [
        await stub.GetResult(jobs_pb2.GetResultRequest(job_id=j), metadata=alpha) for j in backlog
    ]
    done_between = sum(
        1
        for r in results
        if r.HasField("finished_at")
        and submitted_at_ns <= r.finished_at.ToNanoseconds() <= finished_at_ns
    )
    # The worker runs 4 jobs at once: beta's waits for a few of alpha's, not for 2,000.
    assert done_between <= 12, done_between
    for job_id in backlog:
        await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=alpha)


async def test_prompts_stay_out_of_the_logs_and_every_job_operation_is_audited(
    tenants: Tenants, channel: grpc.aio.Channel
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    alpha = as_tenant(tenants.keys["alpha"])
    await stub.Generate(short_request(SECRET_PROMPT), metadata=alpha)
    job_id = (await stub.SubmitJob(job_request(SECRET_PROMPT), metadata=alpha)).job_id
    await stub.GetResult(jobs_pb2.GetResultRequest(job_id=job_id), metadata=alpha)
    await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=alpha)
    audit_path = tenants.data_dir / "audit.log"
    for _ in range(50):
        lines = [json.loads(line) for line in audit_path.read_text().splitlines()]
        if sum(1 for line in lines if line["job_id"] == job_id) >= 3:
            break
        await asyncio.sleep(0.05)
    ours = [line for line in lines if line["job_id"] == job_id]
    assert [line["operation"] for line in ours] == ["submit", "result", "cancel"]
    assert {line["tenant"] for line in ours} == {"alpha"}
    assert all(line["key_id"] and line["outcome"] == "ok" for line in ours)
    everything = tenants.server.log_text() + audit_path.read_text()
    assert SECRET_PROMPT not in everything
    assert all(key not in everything for key in tenants.keys.values())


async def test_a_tenants_watch_and_batch_wait_on_its_events_with_its_own_nats_user(
    tenants: Tenants, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    """`twolane watch` and `twolane batch` with a tenant's NATS credentials read its
    stored events the way those credentials allow (direct get by subject)."""
    user, password = nats_auth.tenant_credentials(tenants.data_dir, "beta")
    creds = tmp_path / "beta.creds"
    creds.write_text(f"{user}\n{password}\n")
    nats_args = ("--nats-url", tenants.nats_url, "--nats-creds", str(creds))
    grpc_args = ("--target", tenants.server.address, "--api-key", tenants.keys["beta"])

    def twolane(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TWOLANE, *args], capture_output=True, text=True, timeout=120)

    submitted = twolane("submit", "watched", "--max-tokens", "3", *grpc_args)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    # Finished first, so that watch has to read the stored event.
    await wait_for_states(stub, [job_id], metadata=as_tenant(tenants.keys["beta"]))
    watched = twolane("watch", job_id, "--timeout", "30", *nats_args)
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["jobId"] == job_id

    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"custom_id": f"c-{i}", "url": "/v1/completions", "body": body}) + "\n"
            for i, body in enumerate([{"prompt": "one", "max_tokens": 3}] * 2)
        )
    )
    output = tmp_path / "out.jsonl"
    for _ in range(2):  # the second run finds every result stored
        done = twolane(
            "batch", str(source), "-o", str(output), "--timeout", "60", *grpc_args, *nats_args
        )
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert sorted(row["custom_id"] for row in rows) == ["c-0", "c-1"]
