"""Traces across the queue and request ids in every answer and log line, on a real server
exporting OTLP/HTTP to a receiver in this test."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import nats
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .nats_fixtures import job_request, wait_for_states
from .serving import ServerProcess, start_server


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: every span any process exports to it."""

    def __init__(self) -> None:
        self.spans: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append(
                                {
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                }
                            )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def of_trace(self, trace_id: str) -> list[dict[str, str]]:
        return [s for s in self.spans if s["trace_id"] == trace_id]

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def traced(receiver: OtlpReceiver) -> Iterator[ServerProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "twolane-test",
    }
    server = start_server("--log-json", env=env)
    yield server
    server.stop()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


async def spans_named(
    receiver: OtlpReceiver, trace_id: str, names: set[str]
) -> dict[str, dict[str, str]]:
    for _ in range(200):
        spans = {s["name"]: s for s in receiver.of_trace(trace_id)}
        if names <= spans.keys():
            return spans
        await asyncio.sleep(0.05)
    pytest.fail(f"spans missing: {sorted(names - spans.keys())}; got {sorted(spans)}")


async def test_one_submit_is_one_trace_from_the_call_to_the_event(
    receiver: OtlpReceiver, traced: ServerProcess
) -> None:
    trace_id, caller_span, header = traceparent()
    assert traced.data_dir is not None
    nc = await nats.connect((traced.data_dir / "nats.url").read_text().strip())
    event_headers: list[dict[str, str]] = []

    async def record(msg: nats.aio.msg.Msg) -> None:
        event_headers.append(dict(msg.headers or {}))

    await nc.subscribe("twolane.results.>", cb=record)
    await nc.flush()
    try:
        async with grpc.aio.insecure_channel(traced.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            job_id = (
                await stub.SubmitJob(job_request("traced"), metadata=(("traceparent", header),))
            ).job_id
            await wait_for_states(stub, [job_id], frozenset({jobs_pb2.JOB_STATE_SUCCEEDED}))
        for _ in range(100):
            if event_headers:
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert event_headers[0]["traceparent"].split("-")[1] == trace_id
    names = {
        "twolane.v1.InferenceService/SubmitJob",
        "job.submit",
        "job.run",
        "job.queued",
        "job.claim",
        "prefill",
        "decode",
        "job.result_write",
        "job.event_publish",
    }
    spans = await spans_named(receiver, trace_id, names)
    submit = spans["twolane.v1.InferenceService/SubmitJob"]
    assert submit["parent"] == caller_span
    assert spans["job.submit"]["parent"] == submit["span_id"]
    # Across the queue: the worker's spans hang under the submission.
    run = spans["job.run"]
    assert run["parent"] == spans["job.submit"]["span_id"]
    for child in ("job.queued", "job.claim", "prefill", "decode", "job.result_write"):
        assert spans[child]["parent"] == run["span_id"], child
    assert spans["job.event_publish"]["parent"] == spans["job.submit"]["span_id"]


async def test_a_generate_call_joins_the_callers_trace(
    receiver: OtlpReceiver, traced: ServerProcess
) -> None:
    trace_id, caller_span, header = traceparent()
    async with grpc.aio.insecure_channel(traced.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = generate_pb2.GenerateRequest(
            prompt="hi", params=generate_pb2.SamplingParams(max_tokens=3, ignore_eos=True)
        )
        await stub.Generate(request, metadata=(("traceparent", header),))
    names = {"twolane.v1.InferenceService/Generate", "validate", "queue", "prefill", "decode"}
    spans = await spans_named(receiver, trace_id, names)
    call = spans["twolane.v1.InferenceService/Generate"]
    assert call["parent"] == caller_span
    assert all(spans[n]["parent"] == call["span_id"] for n in names - {call["name"]})


async def test_a_request_id_comes_back_and_is_in_the_log_line_of_the_request(
    traced: ServerProcess,
) -> None:
    async with grpc.aio.insecure_channel(traced.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = generate_pb2.GenerateRequest(
            prompt="hi", params=generate_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
        )
        call = stub.Generate(request, metadata=(("x-request-id", "order-4711"),))
        reply = await call
        assert reply.request_id == "order-4711"
        assert ("x-request-id", "order-4711") in tuple(await call.trailing_metadata())
        # A failed call is answered with its id too; one without an id gets one.
        bad = stub.Generate(
            generate_pb2.GenerateRequest(prompt=""), metadata=(("x-request-id", "bad-1"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await bad
        assert ("x-request-id", "bad-1") in tuple(info.value.trailing_metadata())
        plain = await stub.Generate(request)
        assert len(plain.request_id) == 32
    for _ in range(100):
        lines = [json.loads(line) for line in traced.lines if line.startswith("{")]
        finished = [e for e in lines if e.get("event") == "request finished"]
        failed = [e for e in lines if e.get("event") == "request failed"]
        if any(e.get("request_id") == "order-4711" for e in finished) and failed:
            break
        await asyncio.sleep(0.05)
    assert any(e.get("request_id") == "order-4711" for e in finished)
    assert any(e.get("request_id") == "bad-1" for e in failed)
