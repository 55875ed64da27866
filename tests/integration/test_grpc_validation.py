"""Bad input gets INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .serving import ServerProcess

P = generate_pb2.SamplingParams

BAD_REQUESTS = {
    "empty prompt": (dict(), "prompt"),
    "prompt and token ids": (dict(prompt="hi", prompt_token_ids=[1, 2]), "prompt_token_ids"),
    "token id past the vocabulary": (dict(prompt_token_ids=[1, 1_000_000]), "prompt_token_ids"),
    "negative token id": (dict(prompt_token_ids=[-1]), "prompt_token_ids"),
    "zero max_tokens": (dict(prompt="hi", params=P(max_tokens=0)), "params.max_tokens"),
    "negative max_tokens": (dict(prompt="hi", params=P(max_tokens=-5)), "params.max_tokens"),
    "max_tokens past the context": (
        dict(prompt="hi", params=P(max_tokens=10_000_000)),
        "params.max_tokens",
    ),
    "negative temperature": (dict(prompt="hi", params=P(temperature=-1.0)), "params.temperature"),
    "zero top_p": (dict(prompt="hi", params=P(top_p=0.0)), "params.top_p"),
    "top_p above one": (dict(prompt="hi", params=P(top_p=1.01)), "params.top_p"),
    "negative top_k": (dict(prompt="hi", params=P(top_k=-1)), "params.top_k"),
    "prompt longer than the context": (dict(prompt="x" * 100_000), "prompt"),
}


def violated_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status details"
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


async def assert_still_serving(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
    ok = await stub.Generate(generate_pb2.GenerateRequest(prompt="ok", params=P(max_tokens=2)))
    assert len(ok.token_ids) >= 1


@pytest.mark.parametrize(("fields", "field"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_bad_generate_request_names_the_field(
    stub: inference_pb2_grpc.InferenceServiceStub, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(generate_pb2.GenerateRequest(**fields))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(info.value)
    assert "Traceback" not in (info.value.details() or "")
    await assert_still_serving(stub)


@pytest.mark.parametrize(("fields", "field"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_bad_stream_request_names_the_field(
    stub: inference_pb2_grpc.InferenceServiceStub, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.GenerateStream(generate_pb2.GenerateStreamRequest(**fields)):
            pass
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(info.value)
    await assert_still_serving(stub)


async def test_bad_input_leaves_no_traceback_in_the_server_log(server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for fields, _ in BAD_REQUESTS.values():
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(generate_pb2.GenerateRequest(**fields))
        await assert_still_serving(stub)
    assert "Traceback" not in server.log_text()


async def test_job_rpcs_say_not_found_for_an_unknown_job(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetResult(jobs_pb2.GetResultRequest(job_id="j1"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "j1" in (info.value.details() or "")


async def test_health_reports_serving(server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "twolane.v1.InferenceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_inference_service(server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [reply async for reply in reflection.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert "twolane.v1.InferenceService" in names
