"""`twolane.client` on a server with API keys whose worker runs one job at a time, serving
the built-in model with a chat template: chats, `wait` on a tenant's completion events
and, without NATS, by polling; cancelling; quotas that push back with RetryInfo; keys
the server refuses."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from twolane.client import (
    AsyncClient,
    Client,
    ClientConfig,
    EventsUnreachable,
    RateLimited,
    RetryEvent,
    RetryPolicy,
    Unauthenticated,
)
from twolane.models.builtin import builtin_model_dir
from twolane.services import nats_auth
from twolane.services.keys import KeysFile, Limits
from twolane.v1 import jobs_pb2

from .grpc_proxy import GrpcProxy
from .nats_fixtures import free_port
from .serving import ServerProcess, start_server

LONG_TOKENS = 1800
# A burst of this many requests, then one a second (quotas.py).
REQUESTS_PER_MINUTE = 60
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass
class Tenants:
    server: ServerProcess
    keys: dict[str, str]  # tenant -> API key
    alpha_creds: Path  # alpha's NATS user, as `twolane nats-creds` prints it

    @property
    def nats_url(self) -> str:
        assert self.server.data_dir is not None
        return (self.server.data_dir / "nats.url").read_text().strip()

    def config(self, tenant: str = "alpha", **changes: object) -> ClientConfig:
        values: dict[str, object] = {
            "targets": (self.server.address,),
            "api_key": self.keys[tenant],
            "nats_url": self.nats_url,
            "nats_creds": str(self.alpha_creds),
        }
        return ClientConfig(**{**values, **changes})  # type: ignore[arg-type]


def chat_model(folder: Path) -> Path:
    """The built-in model with a chat template (it has none of its own)."""
    model_dir = folder / "builtin-chat"
    shutil.copytree(builtin_model_dir(), model_dir)
    config = {"chat_template": CHAT_TEMPLATE}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    folder = tmp_path_factory.mktemp("client-keys")
    keys_file = folder / "keys.json"
    slow = Limits(requests_per_minute=REQUESTS_PER_MINUTE)
    keys = {
        "alpha": KeysFile(keys_file).create("alpha", Limits())[0],
        "slow": KeysFile(keys_file).create("slow", slow)[0],
    }
    server = start_server(
        "--model",
        str(chat_model(folder)),
        "--api-keys",
        str(keys_file),
        "--job-max-batch-inflight",
        "1",
    )
    assert server.data_dir is not None
    user, password = nats_auth.tenant_credentials(server.data_dir, "alpha")
    creds = folder / "alpha.creds"
    creds.write_text(f"{user}\n{password}\n")
    yield Tenants(server, keys, creds)
    server.stop()


@pytest.fixture
def proxy(tenants: Tenants) -> Iterator[GrpcProxy]:
    proxy = GrpcProxy(tenants.server.address).start()
    yield proxy
    proxy.stop()


def start_blocker(client: Client) -> str:
    """A long job the one-job worker is running: jobs submitted now stay queued."""
    job_id = client.submit("blocker", max_tokens=LONG_TOKENS, ignore_eos=True).job_id
    for _ in range(1200):
        if client.result(job_id).state == jobs_pb2.JOB_STATE_RUNNING:
            return job_id
        time.sleep(0.05)
    pytest.fail("the blocker never started")


def checks_of(proxy: GrpcProxy, job_id: str) -> list[jobs_pb2.GetResultResponse]:
    """The answers to the GetResult calls made for `job_id` through the proxy."""
    return [
        jobs_pb2.GetResultResponse.FromString(seen.response)
        for seen in proxy.calls("GetResult")
        if seen.response is not None
        and jobs_pb2.GetResultRequest.FromString(seen.request).job_id == job_id
    ]


def wait_in_the_background(
    client: Client, proxy: GrpcProxy, blocker: str, job_id: str
) -> jobs_pb2.GetResultResponse:
    """Start `client.wait(job_id)`; once it has looked at the queued job, let the job
    run by cancelling the blocker; return what the wait returned."""
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.wait, job_id, 120)
        for _ in range(600):
            if checks_of(proxy, job_id):
                break
            time.sleep(0.05)
        assert checks_of(proxy, job_id)[0].state == jobs_pb2.JOB_STATE_QUEUED
        assert client.cancel(blocker).state == jobs_pb2.JOB_STATE_CANCELLED
        return waiting.result(timeout=120)


def test_the_blocking_client_chats(tenants: Tenants) -> None:
    with Client(tenants.config()) as client:
        reply = client.chat([{"role": "user", "content": "hi"}], max_tokens=4, ignore_eos=True)
        # "user: hi\nassistant: ", one token a byte.
        assert reply.usage.prompt_tokens == len("user: hi\nassistant: ")
        assert len(reply.token_ids) == 4
        with client.stream(messages=[("user", "hi")], max_tokens=4, ignore_eos=True) as stream:
            assert "".join(stream) == reply.text


async def test_the_asyncio_client_chats_and_queues_a_chat(tenants: Tenants) -> None:
    async with AsyncClient(tenants.config()) as client:
        reply = await client.chat([("user", "hi")], max_tokens=4, ignore_eos=True)
        assert len(reply.token_ids) == 4
        job = await client.submit_and_wait(
            messages=[("user", "hi")], max_tokens=4, ignore_eos=True, timeout_s=120
        )
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert list(job.result.token_ids) == list(reply.token_ids)


def test_wait_returns_on_the_tenants_completion_event(tenants: Tenants, proxy: GrpcProxy) -> None:
    # The tenant comes from the NATS user; no GetResult runs while listening.
    config = tenants.config(targets=(proxy.address,), event_recheck_s=600.0)
    assert config.resolved_tenant() == "alpha"
    with Client(config) as client:
        blocker = start_blocker(client)
        job_id = client.submit("after the blocker", max_tokens=4, ignore_eos=True).job_id
        done = wait_in_the_background(client, proxy, blocker, job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and len(done.result.token_ids) == 4
    # One look at the job, then the event: it carries no creation time, GetResult would.
    assert len(checks_of(proxy, job_id)) == 1
    assert not done.HasField("created_at") and done.HasField("finished_at")


def test_wait_polls_with_backoff_when_nats_is_unreachable(
    tenants: Tenants, proxy: GrpcProxy
) -> None:
    config = tenants.config(
        targets=(proxy.address,), nats_url=f"nats://127.0.0.1:{free_port()}", poll_max_s=0.5
    )
    with Client(config) as client:
        blocker = start_blocker(client)
        job_id = client.submit("polled for", max_tokens=4, ignore_eos=True).job_id
        done = wait_in_the_background(client, proxy, blocker, job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and done.HasField("created_at")
    checks = checks_of(proxy, job_id)
    assert len(checks) >= 2 and checks[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_watch_reads_the_event_of_a_finished_job_and_waits_for_a_queued_ones(
    tenants: Tenants,
) -> None:
    with Client(tenants.config()) as client:
        done = client.submit_and_wait("watched", max_tokens=4, ignore_eos=True, timeout_s=120)
        stored = client.watch(done.job_id, 30)  # out already: read from the results stream
        assert stored is not None and stored.job_id == done.job_id
        assert list(stored.result.token_ids) == list(done.result.token_ids)
        blocker = start_blocker(client)
        queued = client.submit("queued", max_tokens=4, ignore_eos=True).job_id
        assert client.watch(queued, 0.5) is None  # not done in time: no event yet
        with ThreadPoolExecutor(1) as pool:
            watching = pool.submit(client.watch, queued, 120)
            assert client.cancel(blocker).state == jobs_pb2.JOB_STATE_CANCELLED
            event = watching.result(timeout=120)
    assert event is not None and event.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert event.tenant == "alpha" and len(event.result.token_ids) == 4


async def test_the_asyncio_client_watches_and_says_when_nats_is_unreachable(
    tenants: Tenants,
) -> None:
    async with AsyncClient(tenants.config()) as client:
        done = await client.submit_and_wait("watched", max_tokens=4, timeout_s=120)
        event = await client.watch(done.job_id, 30)
        assert event is not None and event.state == done.state
    unreachable = f"nats://127.0.0.1:{free_port()}"
    async with AsyncClient(tenants.config(nats_url=unreachable)) as client:
        with pytest.raises(EventsUnreachable, match=unreachable):
            await client.watch(done.job_id, 5)


async def test_the_asyncio_client_cancels_a_queued_job(tenants: Tenants) -> None:
    async with AsyncClient(tenants.config()) as client:
        blocker = (await client.submit("blocker", max_tokens=LONG_TOKENS, ignore_eos=True)).job_id
        queued = (await client.submit("never runs", max_tokens=4)).job_id
        assert (await client.cancel(queued)).state == jobs_pb2.JOB_STATE_CANCELLED
        assert (await client.wait(queued, 60)).state == jobs_pb2.JOB_STATE_CANCELLED
        assert (await client.cancel(blocker)).state == jobs_pb2.JOB_STATE_CANCELLED


def test_a_rate_limited_client_waits_for_the_retry_info_delay(tenants: Tenants) -> None:
    retries: list[RetryEvent] = []
    config = tenants.config("slow", retry=RetryPolicy(max_attempts=3), on_retry=retries.append)
    num_calls = 0
    with Client(config) as client:
        while len(retries) < 2 and num_calls < 4 * REQUESTS_PER_MINUTE:
            client.generate("hi", max_tokens=1)
            num_calls += 1
        attempts = client.stats.num_attempts
    assert len(retries) == 2, "the quota never pushed back"
    for retry in retries:
        assert isinstance(retry.error, RateLimited)
        assert retry.error.retry_after_s is not None and retry.error.retry_after_s > 0
        assert retry.delay_s >= retry.error.retry_after_s
    # Each call pushed back got in at its first retry: the wait was long enough.
    assert [retry.attempt for retry in retries] == [1, 1]
    assert attempts == num_calls + 2
    # Without retries, the caller sees the quota's answer and when to come back.
    no_retries = tenants.config("slow", retry=RetryPolicy(max_attempts=1))
    with Client(no_retries) as client, pytest.raises(RateLimited) as limited:
        client.generate("hi", max_tokens=1)
    assert limited.value.retry_after_s is not None and limited.value.retry_after_s > 0


def test_a_missing_or_unknown_key_is_unauthenticated(tenants: Tenants) -> None:
    for key in ("", "tl_" + "A" * 43):
        with Client(tenants.config(api_key=key)) as client:
            with pytest.raises(Unauthenticated):
                client.generate("hi", max_tokens=1)
            assert client.stats.num_attempts == 1  # not a status a retry could change
