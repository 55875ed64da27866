"""The OpenAI Batch API served on the durable lane, driven by the official `openai` client
against real `twolane serve --http-port 0` processes (built-in model)."""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Batch

from .serving import ServerProcess, start_server

MODEL = "builtin"
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Four jobs at a time, so a long batch is still running when a test cancels it.
    server = start_server(
        "--http-port",
        "0",
        "--job-max-batch-inflight",
        "4",
        env={"TWOLANE_DATA_DIR": str(tmp_path_factory.mktemp("batch-data"))},
    )
    yield server
    server.stop()


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.http_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture
def client(batch_server: ServerProcess) -> openai.OpenAI:
    return client_of(batch_server)


def request_line(custom_id: str, prompt: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": prompt, "temperature": 0, **body},
    }


def upload(client: openai.OpenAI, lines: list[dict[str, Any] | str]) -> str:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    uploaded = client.files.create(file=("input.jsonl", text.encode()), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(text.encode())
    return uploaded.id


def create(client: openai.OpenAI, lines: list[dict[str, Any] | str]) -> Batch:
    return client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"suite": "batch-api"},
    )


def wait_for(
    client: openai.OpenAI, batch_id: str, done: Any = None, timeout_s: float = 300.0
) -> Batch:
    """Poll until the batch is final (or `done(batch)` holds); fail the test otherwise."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if (done(batch) if done else batch.status in FINAL) or time.monotonic() > give_up_at:
            break
        time.sleep(0.2)
    assert done(batch) if done else batch.status in FINAL, batch
    return batch


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.mark.slow
def test_a_200_line_batch_completes_with_one_output_line_per_custom_id_equal_to_interactive(
    client: openai.OpenAI,
) -> None:
    lines = [request_line(f"req-{i}", f"Prompt number {i}:", max_tokens=6) for i in range(200)]
    batch = create(client, lines)
    assert batch.status == "validating" and batch.metadata == {"suite": "batch-api"}

    done = wait_for(client, batch.id)

    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (200, 200)
    assert done.request_counts.failed == 0 and done.error_file_id is None
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    rows = read_jsonl(client, done.output_file_id)
    assert sorted(row["custom_id"] for row in rows) == sorted(line["custom_id"] for line in lines)
    by_id = {row["custom_id"]: row for row in rows}
    for line in lines:
        response = by_id[line["custom_id"]]["response"]
        assert response["status_code"] == 200 and by_id[line["custom_id"]]["error"] is None
        body = response["body"]
        assert body["object"] == "text_completion" and body["model"] == MODEL
        interactive = client.completions.create(**line["body"])
        assert body["choices"][0]["text"] == interactive.choices[0].text
        assert body["usage"]["completion_tokens"] == interactive.usage.completion_tokens


def test_a_file_with_three_bad_lines_completes_with_three_error_lines(
    client: openai.OpenAI,
) -> None:
    lines: list[dict[str, Any] | str] = [
        request_line(f"ok-{i}", f"Fine {i}", max_tokens=3) for i in range(17)
    ]
    lines.insert(4, request_line("typo", "x", max_token=3))  # line 5: an unknown field
    lines.insert(8, request_line("too-long", "x", max_tokens=10**6))  # line 9: past the context
    lines.insert(13, "{not json")  # line 14
    batch = create(client, lines)

    done = wait_for(client, batch.id)

    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (20, 17)
    assert done.request_counts.failed == 3
    assert len(read_jsonl(client, done.output_file_id)) == 17
    errors = read_jsonl(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["typo", "too-long", None]
    typo, too_long, not_json = errors
    assert typo["response"]["status_code"] == 400
    assert typo["response"]["body"]["error"]["param"] == "body.max_token"
    assert "line 5" in typo["response"]["body"]["error"]["message"]
    assert too_long["response"]["body"]["error"]["param"] == "body.max_tokens"
    assert not_json["response"] is None and not_json["error"]["line"] == 14


@pytest.mark.slow
def test_cancelling_mid_run_keeps_the_results_already_finished(client: openai.OpenAI) -> None:
    lines = [
        request_line(f"long-{i}", f"Long {i}", max_tokens=200, ignore_eos=True) for i in range(100)
    ]
    batch = create(client, lines)
    running = wait_for(
        client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 4
    )
    assert running.status == "in_progress"

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(client, batch.id)

    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    assert done.request_counts is not None
    finished = read_jsonl(client, done.output_file_id)
    assert 4 <= len(finished) == done.request_counts.completed < 100
    assert all(row["response"]["body"]["usage"]["completion_tokens"] == 200 for row in finished)
    unrun = read_jsonl(client, done.error_file_id)
    assert {row["error"]["code"] for row in unrun} == {"batch_cancelled"}
    assert len(finished) + len(unrun) == 100
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


@pytest.mark.slow
def test_a_batch_created_before_a_sigkill_of_the_server_completes_after_restart(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    env = {"TWOLANE_DATA_DIR": str(data_dir)}
    # A short ack wait, so the jobs running at the kill are redelivered soon.
    args = ("--http-port", "0", "--job-max-batch-inflight", "2", "--job-ack-wait-s", "2")
    first = start_server(*args, env=env)
    lines = [
        request_line(f"durable-{i}", f"Durable {i}", max_tokens=100, ignore_eos=True)
        for i in range(30)
    ]
    batch = create(client_of(first), lines)
    wait_for(client_of(first), batch.id, lambda b: b.status == "in_progress")
    first.proc.kill()
    first.proc.wait()
    wait_for_data_dir_free(data_dir)

    second = start_server(*args, env=env)
    try:
        client = client_of(second)
        done = wait_for(client, batch.id)
        assert done.status == "completed", done
        assert done.request_counts is not None and done.request_counts.completed == 30
        rows = read_jsonl(client, done.output_file_id)
        assert sorted(r["custom_id"] for r in rows) == sorted(f"durable-{i}" for i in range(30))
    finally:
        second.stop()


def wait_for_data_dir_free(data_dir: Path, timeout_s: float = 60.0) -> None:
    """Until the killed server's nats-server has flushed its store and let go of it."""
    give_up_at = time.monotonic() + timeout_s
    with (data_dir / "twolane.lock").open("a+") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < give_up_at, "the old nats-server never let go"
                time.sleep(0.1)


def test_files_can_be_read_listed_and_deleted(client: openai.OpenAI) -> None:
    file_id = upload(client, [request_line("a", "x")])
    assert client.files.retrieve(file_id).filename == "input.jsonl"
    assert json.loads(client.files.content(file_id).text)["custom_id"] == "a"
    newer_id = upload(client, [request_line("b", "y")])
    first_page = client.files.list(purpose="batch", limit=1)
    assert [f.id for f in first_page.data] == [newer_id] and first_page.has_more
    # The SDK's iterator follows the pages to the end.
    assert {file_id, newer_id} <= {f.id for f in client.files.list(purpose="batch", limit=1)}
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_batches_are_listed_newest_first_a_page_at_a_time(client: openai.OpenAI) -> None:
    ids = [create(client, [request_line("p", "x", max_tokens=1)]).id for _ in range(3)]
    first_page = client.batches.list(limit=2)
    assert [b.id for b in first_page.data] == ids[::-1][:2] and first_page.has_more
    rest = client.batches.list(limit=2, after=first_page.data[-1].id)
    assert rest.data[0].id == ids[0]


def test_batch_requests_with_errors_are_refused_with_their_field(client: openai.OpenAI) -> None:
    file_id = upload(client, [request_line("a", "x")])
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/completions",
            completion_window="24h",
            extra_body={"priority": "high"},
        )
    assert info.value.param == "priority"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-" + "0" * 32, endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_" + "0" * 32)
