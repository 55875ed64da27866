"""Input no valid client would send gets a precise status, and hurts nobody else.

Bodies that are not a message of the method's type (truncated, or a string field that is
not UTF-8), timestamps outside protobuf's range, ids of 10,000 characters, a temperature
too small to divide by among concurrent requests: raw bytes on a real channel, to a real
server and to a gateway.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from integration.nats_fixtures import NatsServer, start_process
from integration.serving import ServerProcess

from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

SERVICE = "twolane.v1.InferenceService"
NOT_UTF8 = bytes.fromhex("0a03c080ff")  # field 1, a 3-byte string that is not UTF-8
TRUNCATED = {
    "Generate": generate_pb2.GenerateRequest(prompt="hello world").SerializeToString()[:-3],
    "GenerateStream": generate_pb2.GenerateStreamRequest(prompt="hello").SerializeToString()[:-2],
    "SubmitJob": jobs_pb2.SubmitJobRequest(
        request=generate_pb2.GenerateRequest(prompt="hello")
    ).SerializeToString()[:-1],
    "GetResult": jobs_pb2.GetResultRequest(job_id="a" * 32).SerializeToString()[:-5],
    "CancelJob": jobs_pb2.CancelJobRequest(job_id="a" * 32).SerializeToString()[:-5],
    "GetStats": b"\x0a\x05ab",  # a length-delimited field cut short
}
WITH_STRING_FIELD_1 = ("Generate", "GenerateStream", "GetResult", "CancelJob")


def call_raw(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError | None:
    """Send `body` as the request of `method`; the error it got, or None."""
    path = f"/{SERVICE}/{method}"
    try:
        if method == "GenerateStream":
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            for _ in stream(body, timeout=30):
                pass
        else:
            unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            unary(body, timeout=30)
    except grpc.RpcError as err:
        return err
    return None


def assert_plainly_invalid(err: grpc.RpcError | None) -> None:
    assert err is not None, "an undecodable body was accepted"
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    details = err.details() or ""
    assert "not a valid twolane.v1." in details
    assert "class" not in details and "Exception" not in details


@pytest.fixture(scope="module")
def channel(shared_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shared_server.address) as channel:
        yield channel


@pytest.mark.parametrize("method", sorted(TRUNCATED))
def test_a_truncated_body_is_invalid_argument(channel: grpc.Channel, method: str) -> None:
    assert_plainly_invalid(call_raw(channel, method, TRUNCATED[method]))


@pytest.mark.parametrize("method", WITH_STRING_FIELD_1)
def test_a_string_that_is_not_utf8_is_invalid_argument(channel: grpc.Channel, method: str) -> None:
    assert_plainly_invalid(call_raw(channel, method, NOT_UTF8))


def test_health_and_reflection_still_answer(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    ok = stub.Generate(
        generate_pb2.GenerateRequest(
            prompt_token_ids=[1, 2, 3], params=generate_pb2.SamplingParams(max_tokens=2)
        ),
        timeout=30,
    )
    assert len(ok.token_ids) == 2


def test_the_gateway_answers_undecodable_bodies_alike(tmp_path: Path) -> None:
    nats_server = NatsServer(tmp_path / "nats").start()
    gateway = start_process("gateway", "--port", "0", "--nats-url", nats_server.url)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            for method in ("Generate", "GenerateStream", "SubmitJob", "GetResult"):
                assert_plainly_invalid(call_raw(channel, method, TRUNCATED[method]))
            assert_plainly_invalid(call_raw(channel, "GetResult", NOT_UTF8))
    finally:
        gateway.stop()
        nats_server.stop()


def violated_fields(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


@pytest.mark.parametrize(
    ("seconds", "nanos", "field"),
    [
        (-62_135_596_801, 0, "deadline.seconds"),  # before year 1
        (253_402_300_800, 0, "deadline.seconds"),  # after year 9999
        (2_000_000_000, -1, "deadline.nanos"),
        (2_000_000_000, 1_000_000_000, "deadline.nanos"),
    ],
)
def test_a_deadline_outside_the_timestamp_range_is_invalid_argument(
    channel: grpc.Channel, seconds: int, nanos: int, field: str
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = jobs_pb2.SubmitJobRequest(request=generate_pb2.GenerateRequest(prompt="hi"))
    request.deadline.seconds = seconds
    request.deadline.nanos = nanos
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitJob(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(info.value)


@pytest.mark.parametrize("rpc", ["GetResult", "CancelJob"])
def test_a_ten_thousand_character_job_id_is_not_found(channel: grpc.Channel, rpc: str) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request_type = jobs_pb2.GetResultRequest if rpc == "GetResult" else jobs_pb2.CancelJobRequest
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request_type(job_id="j" * 10_000), timeout=30)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert len(info.value.details() or "") < 200  # the id is quoted, not echoed whole


def test_a_temperature_too_small_to_divide_by_fails_nobody(channel: grpc.Channel) -> None:
    """16 concurrent requests, one with the smallest normal float32 as its temperature:
    all of them succeed (it is sampled greedily)."""
    stub = inference_pb2_grpc.InferenceServiceStub(channel)

    def generate(i: int) -> generate_pb2.GenerateResponse:
        params = generate_pb2.SamplingParams(max_tokens=24, ignore_eos=True)
        if i == 7:
            params.temperature = 1.175e-38
        request = generate_pb2.GenerateRequest(prompt_token_ids=[42, i + 1], params=params)
        return stub.Generate(request, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(generate, range(16)))
    assert [len(r.token_ids) for r in replies] == [24] * 16
