"""SSRF at submit time, on a server with the default webhook flags: https to public
addresses only. Names resolve from the test's hosts file (TWOLANE_WEBHOOK_HOSTS_FILE): no
DNS query, and no job here is ever delivered, so nothing leaves the machine."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from twolane.services.webhook_urls import HOSTS_FILE_ENV
from twolane.v1 import inference_pb2_grpc

from .nats_fixtures import job_request
from .serving import TWOLANE, ServerProcess, start_server


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    hosts_file = tmp_path_factory.mktemp("hosts") / "hosts"
    hosts_file.write_text("127.0.0.1 loopback.test\n10.1.2.3 internal.test\n")
    server = start_server(env={HOSTS_FILE_ENV: str(hosts_file)})
    yield server
    server.stop()


@pytest.fixture
async def stub(strict: ServerProcess) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(strict.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1/hook", "http is refused"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://10.0.0.1/hook", "private"),
        ("https://loopback.test/hook", "loopback"),
        ("https://internal.test:8443/hook", "private"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
        ("https://100.64.0.1/hook", "CGNAT"),
        ("https://0.0.0.0/hook", "unspecified"),
        ("https://224.0.0.1/hook", "multicast"),
        ("https://unknown.test/hook", "does not resolve"),
        ("ftp://example.com/hook", "scheme"),
    ],
)
async def test_a_webhook_url_that_is_not_public_https_is_refused_at_submit(
    stub: inference_pb2_grpc.InferenceServiceStub, url: str, why: str
) -> None:
    request = job_request("never runs")
    request.webhook_url = url
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SubmitJob(request)
    err = info.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    (violation,) = bad_request.field_violations
    assert violation.field == "webhook_url"
    assert why in violation.description


def test_without_auth_one_secret_is_created_in_the_data_dir_on_first_start(
    strict: ServerProcess,
) -> None:
    assert strict.data_dir is not None
    path = strict.data_dir / "webhook-secrets.json"
    give_up_at = time.monotonic() + 60  # the webhook service starts after the frontends
    while not path.exists() and time.monotonic() < give_up_at:
        time.sleep(0.1)
    assert path.stat().st_mode & 0o777 == 0o600
    out = subprocess.run(
        [TWOLANE, "webhooks", "secret", "--data-dir", str(strict.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    secret = out.stdout.strip()
    assert secret.startswith("whsec_")
    assert secret in path.read_text()
