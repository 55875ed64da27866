"""The HTTP front on a real server with `--api-keys`: the same keys, tenants and quotas as
gRPC, driven by the official `openai` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from openai.types import Batch

from twolane.services.keys import KeysFile, Limits
from twolane.v1 import inference_pb2_grpc, jobs_pb2

from .serving import ServerProcess, start_server

MODEL = "builtin"
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass
class Tenants:
    server: ServerProcess
    keys: dict[str, str]  # tenant -> key

    def client(self, tenant: str) -> openai.OpenAI:
        # No retries: a 401 or 429 must reach the test, not be retried away.
        return openai.OpenAI(
            base_url=self.server.http_url, api_key=self.keys[tenant], max_retries=0, timeout=120
        )


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    created = {
        name: KeysFile(keys_file).create(name, limits)[0]
        for name, limits in (
            ("alpha", Limits()),
            ("beta", Limits()),
            # The gRPC front and the HTTP front each enforce half: one request a minute here.
            ("slow", Limits(requests_per_minute=2)),
        )
    }
    server = start_server("--http-port", "0", "--api-keys", str(keys_file))
    yield Tenants(server, created)
    server.stop()


def test_a_missing_or_unknown_key_is_a_401_and_health_needs_none(tenants: Tenants) -> None:
    for key in ("tl_" + "x" * 43, "not-a-key"):
        stranger = openai.OpenAI(base_url=tenants.server.http_url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            stranger.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    base = tenants.server.http_url.removesuffix("/v1")
    assert httpx.post(base + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(base + "/v1/files").status_code == 401
    assert httpx.get(base + "/health").status_code == 200


def test_a_good_key_is_served_and_the_request_id_comes_back(tenants: Tenants) -> None:
    client = tenants.client("alpha")
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.completions.with_raw_response.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=3,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": "call-42"},
    )
    assert reply.headers["x-request-id"] == "call-42"
    completion = reply.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    # One it did not send gets one made up, on errors too.
    refused = httpx.get(tenants.server.http_url + "/files")
    assert refused.status_code == 401 and len(refused.headers["x-request-id"]) == 32


def test_over_its_request_quota_a_tenant_gets_a_429_with_retry_after(tenants: Tenants) -> None:
    client = tenants.client("slow")
    client.completions.create(model=MODEL, prompt="one", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=MODEL, prompt="two", max_tokens=2)
    assert "requests per minute" in info.value.message
    # One request a minute, just spent: about a minute to wait.
    assert 30 <= int(info.value.response.headers["retry-after"]) <= 60
    # Other tenants are not held back.
    tenants.client("beta").completions.create(model=MODEL, prompt="three", max_tokens=2)


def wait_for(client: openai.OpenAI, batch_id: str, timeout_s: float = 300.0) -> Batch:
    give_up_at = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in FINAL:
        assert time.monotonic() < give_up_at, batch
        time.sleep(0.2)
    return batch


async def test_a_tenants_files_batches_and_jobs_are_invisible_to_another(
    tenants: Tenants,
) -> None:
    alpha, beta = tenants.client("alpha"), tenants.client("beta")
    lines = [
        {
            "custom_id": f"a-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"Alpha {i}", "max_tokens": 2},
        }
        for i in range(3)
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = alpha.files.create(file=("alpha.jsonl", text), purpose="batch")
    batch = alpha.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    # Another tenant can neither see nor touch them, nor use the file for a batch.
    with pytest.raises(openai.NotFoundError):
        beta.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        beta.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )
    assert batch.id not in [b.id for b in beta.batches.list()]
    assert uploaded.id not in [f.id for f in beta.files.list()]
    assert batch.id in [b.id for b in alpha.batches.list()]

    done = wait_for(alpha, batch.id)
    assert done.status == "completed" and done.output_file_id is not None, done
    output_id = done.output_file_id
    rows = [json.loads(line) for line in alpha.files.content(output_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["a-0", "a-1", "a-2"]
    with pytest.raises(openai.NotFoundError):
        beta.files.content(output_id)

    # The lines ran as alpha's jobs: alpha's key reads them over gRPC, beta's cannot.
    job_id = rows[0]["response"]["request_id"]
    async with grpc.aio.insecure_channel(tenants.server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = jobs_pb2.GetResultRequest(job_id=job_id)
        mine = await stub.GetResult(
            request, metadata=(("authorization", f"Bearer {tenants.keys['alpha']}"),)
        )
        assert mine.state == jobs_pb2.JOB_STATE_SUCCEEDED and mine.custom_id == "a-0"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetResult(
                request, metadata=(("authorization", f"Bearer {tenants.keys['beta']}"),)
            )
        assert info.value.code() is grpc.StatusCode.NOT_FOUND

    # Creating the batch and reading its output are in the audit log, as alpha's.
    assert tenants.server.data_dir is not None
    audit = Path(tenants.server.data_dir) / "audit.log"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    mine_ops = {(r["operation"], r["job_id"]) for r in records if r["tenant"] == "alpha"}
    assert ("batch_create", batch.id) in mine_ops
    assert ("file_content", output_id) in mine_ops
    assert any(r["tenant"] == "beta" and r["outcome"] == "NotFoundError" for r in records)
