"""As a new user would: `make run`, then the CLI against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from twolane.v1 import generate_pb2, inference_pb2_grpc

from .serving import TWOLANE, ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def make_run() -> Iterator[ServerProcess]:
    """`make run` as the README says, on a free port and a private data dir."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "TWOLANE_MODEL"},  # the default model
        "TWOLANE_PORT": "0",
        "TWOLANE_DATA_DIR": tempfile.mkdtemp(prefix="twolane-make-run-"),
    }
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: make and the server stop together
    )
    server = ServerProcess(proc)
    threading.Thread(target=server._read_output, daemon=True).start()
    server.wait_listening()
    yield server
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def twolane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWOLANE, *args], capture_output=True, text=True, timeout=300)


def test_generate_against_make_run_prints_english(make_run: ServerProcess) -> None:
    """The default model is a real one: its greedy answer names the city."""
    result = twolane(
        "generate", "The capital of France is", "--max-tokens", "16", "--target", make_run.address
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout


def test_a_chat_turn_against_make_run_is_answered_and_ends_its_turn(
    make_run: ServerProcess,
) -> None:
    result = twolane(
        "generate",
        "--chat",
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "32",
        "--json",
        "--target",
        make_run.address,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert "Paris" in reply["text"] and "<|im_end|>" not in reply["text"]
    assert reply["finishReason"] == "FINISH_REASON_STOP"


@pytest.mark.slow
def test_batch_of_50_prompts_against_make_run_writes_50_results(
    make_run: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "prompts.jsonl"
    lines = [
        {"custom_id": f"line-{i}", "body": {"prompt": f"Prompt {i}:", "max_tokens": 8}}
        for i in range(50)
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "results.jsonl"
    result = twolane("batch", str(source), "-o", str(output), "--target", make_run.address)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(f"line-{i}" for i in range(50))
    assert all(r["error"] is None for r in rows), rows[:3]
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 8 for r in rows)


def test_the_chat_repl_answers_and_keeps_the_conversation(make_run: ServerProcess) -> None:
    france, italy = "What is the capital of France?", "What is the capital of Italy?"
    result = subprocess.run(
        [TWOLANE, "chat", "--target", make_run.address, "--max-tokens", "24"],
        input=f"{france}\n{italy}\n/reset\n{italy}\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    replies = [r.removesuffix("\n") for r in result.stdout.split("you> ") if r]
    assert len(replies) == 3, result.stdout
    assert "Paris" in replies[0], replies
    assert "<|im_end|>" not in result.stdout
    # The referee is the server itself, asked for the same conversations in one call each:
    # the second turn carries the first (question and answer); after /reset it does not.
    user = generate_pb2.ChatMessage
    with grpc.insecure_channel(make_run.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def answer(*messages: generate_pb2.ChatMessage) -> str:
            params = generate_pb2.SamplingParams(max_tokens=24)
            request = generate_pb2.GenerateRequest(messages=messages, params=params)
            return stub.Generate(request, timeout=120).text

        first = answer(user(role="user", content=france))
        with_history = answer(
            user(role="user", content=france),
            user(role="assistant", content=first),
            user(role="user", content=italy),
        )
        fresh = answer(user(role="user", content=italy))
    assert replies == [first, with_history, fresh]
