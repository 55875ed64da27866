"""The batch lane as a new user meets it: `twolane serve` with its embedded nats-server."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serving import TWOLANE, ServerProcess, start_server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[ServerProcess]:
    """As `make run` starts it: no --nats-url, so serve runs its own nats-server."""
    server = start_server(env={"TWOLANE_DATA_DIR": str(data_dir)})
    yield server
    server.stop()


def twolane(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env_args = ["--data-dir", str(data_dir)] if data_dir else []
    return subprocess.run([TWOLANE, *args, *env_args], capture_output=True, text=True, timeout=180)


def nats_url(data_dir: Path) -> str:
    return (data_dir / "nats.url").read_text().strip()


@pytest.mark.slow
def test_batch_writes_one_result_per_line_matched_by_custom_id(
    server: ServerProcess, tmp_path: Path
) -> None:
    lines = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "builtin", "prompt": f"Prompt number {i}:", "max_tokens": 5},
        }
        for i in range(50)
    ]
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "output.jsonl"

    done = twolane("batch", str(source), "-o", str(output), "--target", server.address)

    assert done.returncode == 0, done.stderr
    assert "50 of 50 requests succeeded" in done.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["custom_id"] for row in rows] == [line["custom_id"] for line in lines]
    assert all(row["error"] is None for row in rows)
    assert all(row["response"]["body"]["usage"]["completion_tokens"] == 5 for row in rows)
    assert len({row["id"] for row in rows}) == 50

    # The same file again reuses its jobs rather than running them twice.
    again_output = tmp_path / "again.jsonl"
    again = twolane("batch", str(source), "-o", str(again_output), "--target", server.address)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["id"] for line in again_output.read_text().splitlines()] == [
        row["id"] for row in rows
    ]


def test_submit_then_watch_and_result_report_the_same_job(
    server: ServerProcess, data_dir: Path
) -> None:
    submitted = twolane(
        "submit", "Hello", "--max-tokens", "7", "--custom-id", "c-1", "--target", server.address
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    # watch finds the embedded nats-server through the URL file serve wrote.
    watched = twolane("watch", job_id, "--timeout", "60", data_dir=data_dir)
    assert watched.returncode == 0, watched.stderr
    event = json.loads(watched.stdout)
    assert (event["jobId"], event["state"], event["customId"]) == (
        job_id,
        "JOB_STATE_SUCCEEDED",
        "c-1",
    )

    result = twolane("result", job_id, "--target", server.address)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["state"] == "JOB_STATE_SUCCEEDED"
    assert body["result"]["tokenIds"] == event["result"]["tokenIds"]
    assert len(body["result"]["tokenIds"]) == 7


def test_result_of_an_unknown_job_says_not_found(server: ServerProcess) -> None:
    result = twolane("result", "0" * 32, "--target", server.address)
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_refuses_a_line_without_custom_id(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"body": {"prompt": "x"}}) + "\n")
    done = twolane("batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--target", "x:1")
    assert done.returncode == 2
    assert "line 1: custom_id is missing" in done.stderr


def test_a_request_the_server_refuses_fails_its_own_line_not_the_batch(
    server: ServerProcess, tmp_path: Path
) -> None:
    lines = [
        {"custom_id": "good-1", "body": {"prompt": "one", "max_tokens": 3}},
        {"custom_id": "bad", "body": {"prompt": "two", "max_tokens": 3, "top_p": 2.0}},
        {"custom_id": "good-2", "body": {"prompt": "three", "max_tokens": 3}},
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "mixed-out.jsonl"
    done = twolane("batch", str(source), "-o", str(output), "--target", server.address)
    assert done.returncode == 1
    assert "2 of 3 requests succeeded" in done.stderr
    assert "INVALID_ARGUMENT" in done.stderr and "Traceback" not in done.stderr
    rows = {row["custom_id"]: row for row in map(json.loads, output.read_text().splitlines())}
    assert list(rows) == ["good-1", "bad", "good-2"]
    assert rows["bad"]["response"] is None and rows["bad"]["id"] is None
    assert rows["bad"]["error"]["code"] == "invalid_argument"
    assert "top_p" in rows["bad"]["error"]["message"]
    for good in ("good-1", "good-2"):
        assert rows[good]["error"] is None
        assert rows[good]["response"]["body"]["usage"]["completion_tokens"] == 3


def test_a_second_server_on_the_same_data_dir_is_refused(
    server: ServerProcess, data_dir: Path
) -> None:
    second = subprocess.run(
        [TWOLANE, "serve", "--port", "0", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1
    assert "in use by another twolane serve" in second.stderr


def test_stopping_serve_stops_its_nats_server(data_dir: Path, tmp_path: Path) -> None:
    own_dir = tmp_path / "own"
    server = start_server(env={"TWOLANE_DATA_DIR": str(own_dir)})
    host, port = nats_url(own_dir).removeprefix("nats://").split(":")
    socket.create_connection((host, int(port)), timeout=5).close()

    assert server.stop() == 0
    assert not (own_dir / "nats.url").exists()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()
