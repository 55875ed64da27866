"""The `twolane` command as a new user runs it, against a real server."""

from __future__ import annotations

import subprocess

import grpc

from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

from .grpc_proxy import GrpcProxy
from .serving import TWOLANE, ServerProcess


def twolane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWOLANE, *args], capture_output=True, text=True, timeout=120)


def unary_text(server: ServerProcess, prompt: str, max_tokens: int) -> str:
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        params = generate_pb2.SamplingParams(max_tokens=max_tokens)
        return stub.Generate(generate_pb2.GenerateRequest(prompt=prompt, params=params)).text


def test_generate_prints_the_completion(server: ServerProcess) -> None:
    result = twolane("generate", "Hello", "--max-tokens", "12", "--target", server.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout == unary_text(server, "Hello", 12) + "\n"
    assert result.stdout.strip()


def test_generate_stream_prints_the_same_text(server: ServerProcess) -> None:
    result = twolane(
        "generate", "Hello", "--stream", "--max-tokens", "12", "--target", server.address
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == unary_text(server, "Hello", 12) + "\n"


def test_generate_reports_bad_input_by_field(server: ServerProcess) -> None:
    result = twolane("generate", "Hello", "--max-tokens", "0", "--target", server.address)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "params.max_tokens" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_without_a_server_fails_cleanly() -> None:
    result = twolane("generate", "Hello", "--target", "127.0.0.1:1", "--timeout", "5")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_calls_through_the_client_and_retries_a_lost_call(server: ServerProcess) -> None:
    # The commands use twolane.client: a call refused once (UNAVAILABLE) is made again,
    # with the same request id, and a submit whose answer was lost queues one job.
    proxy = GrpcProxy(server.address).start()
    try:
        proxy.faults.before_forwarding["Generate"] = 1
        result = twolane("generate", "Hello", "--max-tokens", "12", "--target", proxy.address)
        assert result.returncode == 0, result.stderr
        assert result.stdout == unary_text(server, "Hello", 12) + "\n"
        first, second = proxy.calls("Generate")
        assert first.metadata["x-request-id"] == second.metadata["x-request-id"]

        proxy.faults.after_forwarding["SubmitJob"] = 1
        submitted = twolane("submit", "Hello", "--max-tokens", "3", "--target", proxy.address)
        assert submitted.returncode == 0, submitted.stderr
        attempts = proxy.calls("SubmitJob")
        assert len(attempts) == 2 and attempts[0].response is not None
        lost = jobs_pb2.SubmitJobResponse.FromString(attempts[0].response)
        assert submitted.stdout.strip() == lost.job_id
    finally:
        proxy.stop()
