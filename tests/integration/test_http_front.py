"""The OpenAI-compatible HTTP front, driven by the official `openai` client against a
real `twolane serve --http-port 0` on the built-in model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import openai
import pytest

from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc

from .serving import TWOLANE, ServerProcess, start_server, wait_until_idle

MODEL = "builtin"
PROMPT_IDS = [72, 101, 108, 108, 111, 44, 32, 119]
# Near the built-in model's context: seconds of work, far longer than the tests wait.
LONG = {"max_tokens": 2000, "ignore_eos": True}
_METRICS_PORT = re.compile(r"metrics_port=(\d+)")
_CHILD = re.compile(r"child started\s+.*pid=(\d+).*role=(\S+)")


@pytest.fixture(scope="module")
def http_server() -> Iterator[ServerProcess]:
    # Four running and four waiting interactive requests at most, so a queue can fill
    # (and a request of four choices still fits an idle engine).
    server = start_server(
        "--http-port", "0", "--metrics-port", "0", "--max-num-seqs", "4", "--max-waiting", "4"
    )
    yield server
    server.stop()


@pytest.fixture
def client(http_server: ServerProcess) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=http_server.http_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture
async def grpc_stub(
    http_server: ServerProcess,
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(http_server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def aborted_requests(server: ServerProcess) -> float:
    """Interactive requests the engine ended because their caller went away."""
    match = _METRICS_PORT.search(server.log_text())
    assert match, server.log_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for labels, value in re.findall(
        r"^twolane_requests_finished_total\{(.*)\} (\S+)$", text, re.MULTILINE
    ):
        if 'lane="interactive"' in labels and 'reason="abort"' in labels:
            total += float(value)
    return total


async def grpc_tokens(
    stub: inference_pb2_grpc.InferenceServiceStub, max_tokens: int, **prompt: object
) -> list[int]:
    params = generate_pb2.SamplingParams(max_tokens=max_tokens)
    reply = await stub.Generate(generate_pb2.GenerateRequest(params=params, **prompt))
    return list(reply.token_ids)


# ---- what a client gets ----------------------------------------------------------------


def test_models_lists_the_served_model_and_health_answers(
    client: openai.OpenAI, http_server: ServerProcess
) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(http_server.http_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200


def test_a_completion_has_ids_choices_finish_reason_and_usage(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == MODEL and completion.created > 0
    (choice,) = completion.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + 8 > 8


def test_a_streamed_completion_adds_up_to_the_plain_one(client: openai.OpenAI) -> None:
    fields = {
        "model": MODEL,
        "prompt": "Once upon",
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    plain = client.completions.create(**fields)
    chunks = list(
        client.completions.create(**fields, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.id == chunks[0].id for c in chunks)
    # With include_usage the last chunk has no choices and the usage.
    usage, expected = chunks[-1].usage, plain.usage
    assert chunks[-1].choices == [] and usage is not None and expected is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, 12)


async def test_greedy_tokens_equal_grpc_generate_for_the_same_prompt(
    client: openai.OpenAI, grpc_stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    for prompt, grpc_prompt in (
        (PROMPT_IDS, {"prompt_token_ids": PROMPT_IDS}),
        ("The capital of France is", {"prompt": "The capital of France is"}),
    ):
        http = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        streamed = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        streamed_ids = [t for c in streamed for t in c.choices[0].model_extra["token_ids"]]
        expected = await grpc_tokens(grpc_stub, 24, **grpc_prompt)
        assert http.choices[0].model_extra["token_ids"] == expected
        assert streamed_ids == expected


def test_n_choices_and_several_prompts_each_get_their_own_choice(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL,
        prompt=["Hi", "Yo"],
        n=2,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    texts = [c.text for c in completion.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies of one answer
    assert completion.usage is not None and completion.usage.completion_tokens == 16
    streamed = client.completions.create(
        model=MODEL,
        prompt="Hi",
        n=2,
        max_tokens=4,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    by_choice: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_choice[choice.index] = by_choice.get(choice.index, "") + choice.text
    assert by_choice == {0: texts[0], 1: texts[0]}


def test_logprobs_come_with_their_tokens(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.token_logprobs) == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert len(logprobs.tokens) == 6 and all(isinstance(t, str) for t in logprobs.tokens)


# ---- errors of each kind ---------------------------------------------------------------


def test_an_unknown_field_is_a_400_that_names_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={"max_token": 5})
    assert info.value.param == "max_token"
    assert "max_token" in info.value.message and "unknown" in info.value.message


def test_a_bad_value_is_a_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", top_p=1.5, temperature=-1)
    assert {"temperature", "top_p"} <= set(re.findall(r"(\w+):", info.value.message))


def test_chat_on_a_model_without_a_chat_template_is_a_400_on_messages(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.param == "messages"


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt="x")
    assert info.value.code == "model_not_found"


def test_an_unknown_path_is_a_404_in_the_same_shape(http_server: ServerProcess) -> None:
    reply = httpx.get(http_server.http_url + "/embeddings")
    assert reply.status_code == 404
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_full_queue_is_a_429_with_retry_after(
    http_server: ServerProcess, grpc_stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    aclient = openai.AsyncOpenAI(base_url=http_server.http_url, api_key="none", max_retries=0)
    streams = []
    try:
        for _ in range(4):  # every slot taken
            stream = await aclient.completions.create(
                model=MODEL, prompt="busy", stream=True, extra_body=LONG
            )
            await anext(aiter(stream))
            streams.append(stream)
        waiting = [
            asyncio.ensure_future(
                aclient.completions.create(model=MODEL, prompt="wait", stream=True, extra_body=LONG)
            )
            for _ in range(4)
        ]
        for _ in range(200):
            stats = await grpc_stub.GetStats(inference_pb2.GetStatsRequest())
            if stats.num_waiting == 4:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as info:
            await aclient.completions.create(model=MODEL, prompt="one too many", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        for pending in waiting:
            pending.cancel()
    finally:
        for stream in streams:
            await stream.close()
        await aclient.close()
    await wait_until_idle(grpc_stub)


# ---- a client that leaves --------------------------------------------------------------


async def test_a_client_disconnecting_mid_stream_frees_its_kv_blocks(
    http_server: ServerProcess, grpc_stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    aborted_before = aborted_requests(http_server)
    body = {"model": MODEL, "prompt": "bye", "stream": True, **LONG}
    async with (
        httpx.AsyncClient(base_url=http_server.http_url, timeout=60) as http,
        http.stream("POST", "/completions", json=body) as response,
    ):
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        stats = await grpc_stub.GetStats(inference_pb2.GetStatsRequest())
        assert stats.num_running >= 1 and stats.num_used_blocks > 0
    stats = await wait_until_idle(grpc_stub)
    assert (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0)
    assert aborted_requests(http_server) == aborted_before + 1


async def test_a_client_giving_up_on_a_plain_completion_frees_its_kv_blocks(
    http_server: ServerProcess, grpc_stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    aborted_before = aborted_requests(http_server)
    body = {"model": MODEL, "prompt": "impatient", **LONG}
    async with httpx.AsyncClient(base_url=http_server.http_url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/completions", json=body)
    stats = await wait_until_idle(grpc_stub)
    assert (stats.num_running, stats.num_used_blocks) == (0, 0)
    assert aborted_requests(http_server) == aborted_before + 1


def test_a_taken_http_port_fails_startup_with_exit_1(http_server: ServerProcess) -> None:
    taken = http_server.http_url.rsplit(":", 1)[1].split("/")[0]
    second = subprocess.run(
        [TWOLANE, "serve", "--port", "0", "--http-port", taken],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TWOLANE_DATA_DIR": str(http_server.data_dir) + "-second"},
    )
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken}" in second.stderr
    assert "listening" not in second.stderr


def test_sse_events_are_openai_chunks_ending_with_done(http_server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", http_server.http_url + "/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}


# Last: it restarts the module server's engine core.
def test_the_engine_core_down_is_a_503_until_it_is_back(
    client: openai.OpenAI, http_server: ServerProcess
) -> None:
    children = _CHILD.findall(http_server.log_text())
    cores = [int(pid) for pid, role in children if role == "engine-core"]
    assert cores, http_server.log_text()
    os.kill(cores[-1], signal.SIGKILL)
    with pytest.raises(openai.InternalServerError) as info:
        for _ in range(100):  # until the front has noticed
            client.completions.create(model=MODEL, prompt="anyone?", max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"
    health = httpx.get(http_server.http_url.removesuffix("/v1") + "/health")
    assert health.status_code == 503
    for _ in range(600):  # the supervisor starts the core again
        if httpx.get(http_server.http_url.removesuffix("/v1") + "/health").status_code == 200:
            break
        time.sleep(0.1)
    completion = client.completions.create(model=MODEL, prompt="back?", max_tokens=2)
    assert completion.usage is not None and completion.usage.completion_tokens == 2
