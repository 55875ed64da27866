"""Webhook delivery end to end: `twolane serve` (with auth on, so each tenant signs with its
own secret), real receivers on loopback, signatures checked with `standardwebhooks`.

The server allows http and the hosts `127.0.0.1` and `receiver.test` (its receivers run on
loopback); names resolve from a hosts file of the test's own (TWOLANE_WEBHOOK_HOSTS_FILE),
so no DNS query and no packet ever leaves the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import nats.js.errors
import pytest
import trustme
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from twolane.services import nats_auth
from twolane.services.keys import KeysFile, Limits
from twolane.services.webhook_urls import HOSTS_FILE_ENV
from twolane.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2, webhook_delivery_pb2

from .nats_fixtures import job_request, wait_for_states
from .serving import TWOLANE, ServerProcess, start_server
from .webhook_receiver import DeadEndpoint, Receiver

SCHEDULE = "0.2s,1s"  # three attempts: the first, and one retry per step
NUM_ATTEMPTS = 3
MAX_PER_HOST = 4
TIMEOUT_S = 5.0
# Resolves at submit time in the rebinding test, but is never connected to.
PUBLIC_ADDRESS = "93.184.215.14"
DLQ_SUBJECT = "twolane.dlq.webhooks"


@dataclass
class Hooks:
    server: ServerProcess
    hosts_file: Path
    ca: trustme.CA
    keys: dict[str, str]  # tenant -> API key

    @property
    def data_dir(self) -> Path:
        assert self.server.data_dir is not None
        return self.server.data_dir

    def set_hosts(self, lines: str) -> None:
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text(lines)
        os.replace(tmp, self.hosts_file)

    def secret(self, tenant: str) -> str:
        out = subprocess.run(
            [TWOLANE, "webhooks", "secret", "--data-dir", str(self.data_dir), "--tenant", tenant],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def webhooks_pid(self) -> int:
        """The webhook service the supervisor started last."""
        pids = [
            int(entry["pid"])
            for entry in _log_entries(self.server)
            if entry.get("event") == "child started" and entry.get("role") == "webhooks"
        ]
        assert pids, "no webhook service in the log"
        return pids[-1]

    async def nats(self) -> nats.NATS:
        url = (self.data_dir / "nats.url").read_text().strip()
        user, password = nats_auth.read_credentials(nats_auth.service_creds_path(self.data_dir))
        return await nats.connect(url, user=user, password=password)


HOSTS = "127.0.0.1 receiver.test loopback.test\n"


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooks]:
    folder = tmp_path_factory.mktemp("webhooks")
    hosts_file = folder / "hosts"
    hosts_file.write_text(HOSTS)
    ca = trustme.CA()
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    keys_file = folder / "keys.json"
    keys = {t: KeysFile(keys_file).create(t, Limits())[0] for t in ("alpha", "beta")}
    server = start_server(
        "--log-json",
        "--metrics-port",
        "0",
        "--api-keys",
        str(keys_file),
        "--webhook-allow-http",
        "--webhook-allow-hosts",
        "127.0.0.1,receiver.test",
        "--webhook-retry-schedule",
        SCHEDULE,
        "--webhook-timeout-s",
        str(TIMEOUT_S),
        "--webhook-ack-wait-s",
        "3",
        "--webhook-max-per-host",
        str(MAX_PER_HOST),
        "--webhook-ca-file",
        str(ca_file),
        env={HOSTS_FILE_ENV: str(hosts_file)},
    )
    yield Hooks(server, hosts_file, ca, keys)
    server.stop()


@pytest.fixture
async def stub(hooks: Hooks) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(hooks.server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = await Receiver().start()
    yield receiver
    await receiver.close()


def as_tenant(hooks: Hooks, tenant: str = "alpha") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {hooks.keys[tenant]}"),)


async def submit(
    stub: inference_pb2_grpc.InferenceServiceStub,
    hooks: Hooks,
    url: str,
    prompt: str = "hello",
    tenant: str = "alpha",
) -> str:
    request = job_request(prompt, max_tokens=3)
    request.webhook_url = url
    reply = await stub.SubmitJob(request, metadata=as_tenant(hooks, tenant))
    return reply.job_id


async def wait_webhook(
    stub: inference_pb2_grpc.InferenceServiceStub,
    hooks: Hooks,
    job_id: str,
    states: set[int],
    tenant: str = "alpha",
    timeout_s: float = 90.0,
) -> jobs_pb2.GetResultResponse:
    """Poll GetResult until the job's webhook is in one of `states`."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        result = await stub.GetResult(
            jobs_pb2.GetResultRequest(job_id=job_id), metadata=as_tenant(hooks, tenant)
        )
        if result.webhook.state in states:
            return result
        if time.monotonic() > give_up_at:
            pytest.fail(f"webhook of {job_id} stayed {result.webhook}")
        await asyncio.sleep(0.1)


async def dead_lettered(
    js: nats.js.JetStreamContext, job_id: str
) -> webhook_delivery_pb2.WebhookDelivery:
    """The failed delivery once its dead letter is out (noted right after FAILED)."""
    bucket = await js.key_value("twolane_webhooks")
    give_up_at = time.monotonic() + 30
    while True:
        entry = await bucket.get(job_id)
        delivery = webhook_delivery_pb2.WebhookDelivery.FromString(entry.value)
        if delivery.dlq_sequence or time.monotonic() > give_up_at:
            return delivery
        await asyncio.sleep(0.1)


def _log_entries(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in list(server.lines) if line.startswith("{")]


DELIVERED = {jobs_pb2.WEBHOOK_STATE_DELIVERED}
FAILED = {jobs_pb2.WEBHOOK_STATE_FAILED}


async def test_a_job_with_a_webhook_is_delivered_once_and_its_signature_verifies(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub, receiver: Receiver
) -> None:
    job_id = await submit(stub, hooks, receiver.url(), prompt="signed")
    result = await wait_webhook(stub, hooks, job_id, DELIVERED)
    assert len(receiver.deliveries) == 1
    delivery = receiver.deliveries[0]
    payload = Webhook(hooks.secret("alpha")).verify(delivery.body, delivery.headers)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["job_id"] == job_id
    assert payload["data"]["state"] == "JOB_STATE_SUCCEEDED"
    assert payload["data"]["result"]["text"] == result.result.text
    assert payload["timestamp"] == result.finished_at.ToJsonString()
    assert delivery.webhook_id == result.webhook.webhook_id == f"msg_{job_id}"
    assert result.webhook.attempts == 1
    assert result.webhook.last_http_status == 200
    # Another tenant's secret does not verify it.
    with pytest.raises(WebhookVerificationError):
        Webhook(hooks.secret("beta")).verify(delivery.body, delivery.headers)


def test_each_tenant_has_its_own_secret_kept_private(hooks: Hooks) -> None:
    alpha, beta = hooks.secret("alpha"), hooks.secret("beta")
    assert alpha.startswith("whsec_") and beta.startswith("whsec_") and alpha != beta
    assert hooks.secret("alpha") == alpha  # printed again, not created again
    assert (hooks.data_dir / "webhook-secrets.json").stat().st_mode & 0o777 == 0o600


def cli(hooks: Hooks, *args: str, tenant: str = "alpha") -> str:
    """A `twolane` job command against the server as `tenant`; its stdout."""
    out = subprocess.run(
        [TWOLANE, *args, "--target", hooks.server.address, "--api-key", hooks.keys[tenant]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_submit_and_batch_on_the_command_line_take_a_webhook_url(
    hooks: Hooks, receiver: Receiver, tmp_path: Path
) -> None:
    job_id = cli(hooks, "submit", "from the shell", "--webhook-url", receiver.url()).strip()
    lines = [json.dumps({"custom_id": f"row-{i}", "body": {"prompt": f"p{i}"}}) for i in range(3)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    # A data dir without nats.url: `twolane batch` waits by polling GetResult, as a
    # tenant with only an API key does.
    (tmp_path / "no-nats").mkdir()
    cli(
        hooks,
        "batch",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--max-tokens",
        "2",
        "--webhook-url",
        receiver.url(path="/batch"),
        "--data-dir",
        str(tmp_path / "no-nats"),
    )
    await receiver.wait_for(4)
    hook = Webhook(hooks.secret("alpha"))
    events = [hook.verify(d.body, d.headers) for d in receiver.deliveries]
    assert {e["data"]["job_id"] for e in events} >= {job_id}
    assert sorted(e["data"].get("custom_id", "") for e in events) == ["", "row-0", "row-1", "row-2"]


async def test_after_a_rotation_deliveries_verify_with_the_old_and_the_new_secret(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub, receiver: Receiver
) -> None:
    old = hooks.secret("beta")
    out = subprocess.run(
        [TWOLANE, "webhooks", "rotate", "--data-dir", str(hooks.data_dir), "--tenant", "beta"],
        capture_output=True,
        text=True,
        check=True,
    )
    new = out.stdout.strip()
    assert new.startswith("whsec_") and new != old and hooks.secret("beta") == new
    job_id = await submit(stub, hooks, receiver.url(), prompt="rotated", tenant="beta")
    await wait_webhook(stub, hooks, job_id, DELIVERED, tenant="beta")
    delivery = receiver.deliveries[0]
    assert len(delivery.headers["webhook-signature"].split()) == 2
    for secret in (old, new):  # receivers switch whenever they like
        assert Webhook(secret).verify(delivery.body, delivery.headers)["data"]["job_id"] == job_id


async def test_a_receiver_failing_twice_gets_three_attempts_with_growing_gaps(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    receiver = await Receiver(statuses=[500, 500]).start()
    try:
        job_id = await submit(stub, hooks, receiver.url())
        result = await wait_webhook(stub, hooks, job_id, DELIVERED)
    finally:
        await receiver.close()
    assert result.webhook.attempts == 3
    assert result.webhook.last_http_status == 200
    assert result.webhook.last_error == ""
    times = [d.received_s for d in receiver.deliveries]
    assert len(times) == 3
    # Each retry waits at least half its step of the schedule (jitter draws from half the
    # step to the step); the machine may only add to that, so only the floor is checked.
    steps_s = [float(step.removesuffix("s")) for step in SCHEDULE.split(",")]
    gaps_s = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap_s >= step_s / 2 for gap_s, step_s in zip(gaps_s, steps_s, strict=True)), gaps_s
    assert {d.webhook_id for d in receiver.deliveries} == {f"msg_{job_id}"}


async def test_an_always_failing_receiver_ends_failed_on_the_dlq_and_redeliver_works(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    receiver = await Receiver(default_status=503).start()
    try:
        job_id = await submit(stub, hooks, receiver.url())
        failed = await wait_webhook(stub, hooks, job_id, FAILED)
        assert len(receiver.deliveries) == NUM_ATTEMPTS
        assert failed.webhook.attempts == NUM_ATTEMPTS
        assert failed.webhook.last_http_status == 503
        assert "HTTP 503" in failed.webhook.last_error
        nc = await hooks.nats()
        try:
            js = nc.jetstream()
            delivery = await dead_lettered(js, job_id)
            letter_msg = await js.get_msg("TWOLANE_DLQ", delivery.dlq_sequence)
            assert letter_msg.subject == DLQ_SUBJECT
            letter = webhook_delivery_pb2.WebhookDeadLetter.FromString(letter_msg.data)
            assert (letter.job_id, letter.attempts) == (job_id, NUM_ATTEMPTS)
            assert letter.origin == f"http://127.0.0.1:{receiver.port}"

            receiver.default_status = 200
            out = subprocess.run(
                [TWOLANE, "webhooks", "redeliver", job_id, "--data-dir", str(hooks.data_dir)],
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, out.stderr
            delivered = await wait_webhook(stub, hooks, job_id, DELIVERED)
            assert delivered.webhook.attempts == 1
            assert len(receiver.deliveries) == NUM_ATTEMPTS + 1
            assert {d.webhook_id for d in receiver.deliveries} == {f"msg_{job_id}"}
            with pytest.raises(nats.js.errors.NotFoundError):
                await js.get_msg("TWOLANE_DLQ", delivery.dlq_sequence)
        finally:
            await nc.close()
    finally:
        await receiver.close()


async def test_410_gone_stops_the_retries(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    receiver = await Receiver(default_status=410).start()
    try:
        job_id = await submit(stub, hooks, receiver.url())
        result = await wait_webhook(stub, hooks, job_id, FAILED)
    finally:
        await receiver.close()
    assert result.webhook.attempts == 1
    assert result.webhook.last_http_status == 410
    assert len(receiver.deliveries) == 1


async def test_https_delivery_connects_to_the_checked_address_with_the_names_certificate(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    hooks.ca.issue_cert("receiver.test").configure_cert(context)
    receiver = await Receiver(ssl_context=context).start()
    try:
        job_id = await submit(stub, hooks, receiver.url(host="receiver.test"))
        result = await wait_webhook(stub, hooks, job_id, DELIVERED)
    finally:
        await receiver.close()
    assert result.webhook.attempts == 1
    # Pinned to 127.0.0.1 by the hosts file, yet the Host header and the certificate
    # (checked for receiver.test) are the name's.
    assert receiver.deliveries[0].host == f"receiver.test:{receiver.port}"


async def test_a_name_that_later_resolves_to_a_private_address_is_refused_at_connect(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    # The webhook service is stopped until the name points elsewhere, so that it never
    # connects (nor sends anything) to the public address the name had at submit time.
    pid = hooks.webhooks_pid()
    hooks.set_hosts(HOSTS + f"{PUBLIC_ADDRESS} rebind.test\n")
    os.kill(pid, signal.SIGSTOP)
    try:
        job_id = await submit(stub, hooks, "http://rebind.test/hook")
        await wait_for_states(stub, [job_id], metadata=as_tenant(hooks))
        hooks.set_hosts(HOSTS + "10.0.0.7 rebind.test\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    result = await wait_webhook(stub, hooks, job_id, FAILED)
    assert result.webhook.attempts == NUM_ATTEMPTS
    assert result.webhook.last_http_status == 0
    assert "refused when connecting" in result.webhook.last_error
    assert "private address" in result.webhook.last_error


@pytest.mark.slow
async def test_the_webhook_service_killed_with_50_deliveries_pending_delivers_each_after_restart(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    receiver = await Receiver(delay_s=0.3).start()
    try:
        job_ids = [await submit(stub, hooks, receiver.url(), prompt=f"job {i}") for i in range(50)]
        await receiver.wait_for(2 * MAX_PER_HOST)
        pid = hooks.webhooks_pid()
        os.kill(pid, signal.SIGKILL)
        for job_id in job_ids:
            await wait_webhook(stub, hooks, job_id, DELIVERED, timeout_s=120)
        assert hooks.webhooks_pid() != pid  # the supervisor started a new one
    finally:
        await receiver.close()
    assert receiver.job_ids() == set(job_ids)
    for job_id in job_ids:
        ids = {d.webhook_id for d in receiver.deliveries if d.job_id == job_id}
        assert ids == {f"msg_{job_id}"}
    # A repeat is only ever an attempt that was in flight when the service died.
    assert len(receiver.deliveries) - len(job_ids) <= MAX_PER_HOST


async def test_one_dead_endpoint_does_not_hold_up_a_healthy_one(
    hooks: Hooks, stub: inference_pb2_grpc.InferenceServiceStub, receiver: Receiver
) -> None:
    dead = await DeadEndpoint().start()
    try:
        for i in range(3 * MAX_PER_HOST):
            await submit(stub, hooks, dead.url(), prompt=f"dead {i}")
        healthy = await submit(stub, hooks, receiver.url(), prompt="healthy")
        await receiver.wait_for(1)
        # Delivered while the dead endpoint's first attempts still hang (none has
        # timed out yet): the healthy host did not wait for them.
        assert dead.num_closed == 0
        assert 0 < dead.max_open <= MAX_PER_HOST
        assert receiver.deliveries[0].job_id == healthy
    finally:
        await dead.close()


_METRICS_PORT = re.compile(r'"metrics_port": (\d+)')


def scrape(hooks: Hooks) -> str:
    match = _METRICS_PORT.search(hooks.server.log_text())
    assert match, "no metrics port in the log"
    with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=10) as r:
        return r.read().decode()


_SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", re.MULTILINE)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the series `name` with these labels (and model_name="builtin")."""
    wanted = {**labels, "model_name": "builtin"}
    for match in _SAMPLE.finditer(text):
        found = dict(re.findall(r'([a-z_]+)="([^"]*)"', match.group(2) or ""))
        if match.group(1) == name and found == wanted:
            return float(match.group(3))
    raise AssertionError(f"{name}{wanted} not exported")


async def test_metrics_count_deliveries_attempts_circuits_and_the_dlq(hooks: Hooks) -> None:
    # After the tests above: deliveries ended both ways, and failed ones sit on the DLQ
    # (the depth is sampled every few seconds).
    give_up_at = time.monotonic() + 30
    while True:
        text = scrape(hooks)
        settled = "twolane_webhook_circuit_state{" in text and re.search(
            r"^twolane_webhook_dlq_depth\{[^}]*\} [1-9]", text, re.MULTILINE
        )
        if settled or time.monotonic() > give_up_at:
            break
        await asyncio.sleep(1)
    assert sample(text, "twolane_webhook_dlq_depth") >= 1
    assert sample(text, "twolane_webhook_deliveries_total", outcome="delivered") >= 50
    assert sample(text, "twolane_webhook_deliveries_total", outcome="failed") >= 2
    assert sample(text, "twolane_webhook_attempts_total", result="http_error") >= 4
    assert sample(text, "twolane_webhook_attempts_total", result="refused") >= NUM_ATTEMPTS
    assert sample(text, "twolane_webhook_attempt_seconds_count") >= 50
    assert "twolane_webhook_circuit_state{" in text
    # Failed deliveries share TWOLANE_DLQ with failed jobs, yet count apart (no job failed).
    assert sample(text, "twolane_jobs_dead_letters") == 0
    async with grpc.aio.insecure_channel(hooks.server.address) as channel:
        stats = await inference_pb2_grpc.InferenceServiceStub(channel).GetStats(
            inference_pb2.GetStatsRequest(), metadata=as_tenant(hooks)
        )
    assert stats.num_dead_letters == 0
    assert stats.num_webhook_dead_letters >= 1
