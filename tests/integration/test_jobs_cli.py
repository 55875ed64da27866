"""The batch lane as a new user meets it: `twolane serve` with its embedded nats-server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .nats_fixtures import stream_last_seq
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


def write_lines(path: Path, lines: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def completion_lines(num: int, max_tokens: int = 5) -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "builtin", "prompt": f"Prompt number {i}:", "max_tokens": max_tokens},
        }
        for i in range(num)
    ]


def read_rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_batch_writes_one_result_per_line_matched_by_custom_id(
    server: ServerProcess, data_dir: Path, tmp_path: Path
) -> None:
    lines = completion_lines(50)
    source = write_lines(tmp_path / "input.jsonl", lines)
    output = tmp_path / "output.jsonl"

    done = twolane(
        "batch", str(source), "-o", str(output), "--target", server.address, data_dir=data_dir
    )

    assert done.returncode == 0, done.stderr
    assert "50 of 50 requests succeeded (0 reused" in done.stderr
    rows = read_rows(output)
    assert sorted(row["custom_id"] for row in rows) == sorted(line["custom_id"] for line in lines)
    assert all(row["error"] is None for row in rows)
    assert all(row["response"]["status_code"] == 200 for row in rows)
    bodies = [row["response"]["body"] for row in rows]
    assert all(
        body["object"] == "text_completion" and body["choices"][0]["text"] for body in bodies
    )
    assert all(body["usage"]["completion_tokens"] == 5 for body in bodies)
    assert len({row["id"] for row in rows}) == 50
    assert not (tmp_path / "output.errors.jsonl").exists()

    # The same file on the same model again reuses its jobs rather than running them twice,
    # and says so.
    again_output = tmp_path / "again.jsonl"
    again = twolane(
        "batch", str(source), "-o", str(again_output), "--target", server.address, data_dir=data_dir
    )
    assert again.returncode == 0, again.stderr
    assert "50 of 50 requests succeeded (50 reused" in again.stderr
    assert sorted(row["id"] for row in read_rows(again_output)) == sorted(row["id"] for row in rows)


def test_batch_checks_every_line_first_and_names_each_bad_one(
    server: ServerProcess, data_dir: Path, tmp_path: Path
) -> None:
    lines = completion_lines(3)
    lines[1]["body"]["max_token"] = 5  # type: ignore[index]
    lines[2]["body"]["top_k"] = "many"  # type: ignore[index]
    source = write_lines(tmp_path / "bad.jsonl", lines)
    jobs_before = asyncio.run(stream_last_seq(nats_url(data_dir), "TWOLANE_JOBS"))

    done = twolane(
        "batch",
        str(source),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--target",
        server.address,
        data_dir=data_dir,
    )

    assert done.returncode == 2
    assert "line 2 (custom_id 'request-1'): body.max_token: unknown" in done.stderr
    assert "line 3 (custom_id 'request-2'): body.top_k" in done.stderr
    assert "nothing was submitted" in done.stderr
    assert asyncio.run(stream_last_seq(nats_url(data_dir), "TWOLANE_JOBS")) == jobs_before


def test_a_line_the_server_refuses_goes_to_the_error_file_and_the_rest_run(
    server: ServerProcess, data_dir: Path, tmp_path: Path
) -> None:
    lines = completion_lines(3, max_tokens=4)
    lines[1]["body"]["max_tokens"] = 10**6  # type: ignore[index]  # past the context
    source = write_lines(tmp_path / "refused.jsonl", lines)
    output = tmp_path / "out.jsonl"

    done = twolane(
        "batch", str(source), "-o", str(output), "--target", server.address, data_dir=data_dir
    )

    assert done.returncode == 1
    assert "line 2 (custom_id 'request-1')" in done.stderr and "max_tokens" in done.stderr
    assert sorted(row["custom_id"] for row in read_rows(output)) == ["request-0", "request-2"]
    (error,) = read_rows(tmp_path / "out.errors.jsonl")
    assert error["custom_id"] == "request-1" and error["response"]["status_code"] == 400
    assert "2 of 3 requests succeeded" in done.stderr


@pytest.mark.slow
def test_a_rerun_on_another_model_runs_again_instead_of_reusing_results(
    llama_dir: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "data"
    source = write_lines(tmp_path / "input.jsonl", completion_lines(5, max_tokens=6))
    outputs = []
    for model in ("builtin", str(llama_dir)):
        server = start_server("--model", model, env={"TWOLANE_DATA_DIR": str(shared)})
        try:
            output = tmp_path / f"out-{len(outputs)}.jsonl"
            done = twolane(
                "batch", str(source), "-o", str(output), "--target", server.address, data_dir=shared
            )
            assert done.returncode == 0, done.stderr
            assert "5 of 5 requests succeeded (0 reused" in done.stderr
            outputs.append({row["custom_id"]: row for row in read_rows(output)})
        finally:
            server.stop()
    builtin, llama = outputs
    assert all(builtin[c]["id"] != llama[c]["id"] for c in builtin)
    assert {row["response"]["body"]["model"] for row in llama.values()} == {llama_dir.name}


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
    assert "line 1: custom_id: required" in done.stderr


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
