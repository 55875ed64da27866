"""Helpers to run `twolane serve` as a real subprocess on loopback and to watch its engine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from twolane.v1 import inference_pb2, inference_pb2_grpc

TWOLANE = str(Path(sys.executable).with_name("twolane"))
STARTUP_TIMEOUT_S = 180.0
_PORT_IN_CONSOLE_LINE = re.compile(r"\bport=(\d+)")
# Every process started through ServerProcess, so a failed test can show their logs.
STARTED: list[ServerProcess] = []


@dataclass
class ServerProcess:
    """A `twolane serve` subprocess and everything it has logged so far."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    port: int | None = None
    http_port: int | None = None
    _listening: threading.Event = field(default_factory=threading.Event)
    _http_listening: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        STARTED.append(self)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (`--http-port`), once it listens."""
        self._http_listening.wait(STARTUP_TIMEOUT_S)
        if self.http_port is None:
            pytest.fail(f"twolane serve reported no HTTP port; its output:\n{self.log_text()}")
        return f"http://127.0.0.1:{self.http_port}/v1"

    def log_text(self) -> str:
        return "".join(self.lines)

    def _read_output(self) -> None:
        # Reading continuously also keeps the pipe from filling and blocking the server.
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.port is None and "listening" in line and "http listening" not in line:
                self.port = _listening_port(line)
                self._listening.set()
            if self.http_port is None and "http listening" in line:
                self.http_port = _listening_port(line)
                self._http_listening.set()
        self._listening.set()
        self._http_listening.set()

    def wait_listening(self) -> None:
        self._listening.wait(STARTUP_TIMEOUT_S)
        if self.port is None:
            self.stop()
            pytest.fail(f"twolane serve did not report a port; its output:\n{self.log_text()}")

    def wait_for_line(self, text: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until the server has logged a line containing `text`; fail the test if not."""
        give_up_at = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > give_up_at:
                pytest.fail(f"twolane serve never logged {text!r}; its output:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _listening_port(line: str) -> int | None:
    if line.lstrip().startswith("{"):
        return int(json.loads(line)["port"])
    match = _PORT_IN_CONSOLE_LINE.search(line)
    return int(match.group(1)) if match else None


def start_server(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `twolane serve --port 0 ARGS` and wait for its `listening` line.

    Each server gets its own data dir (its embedded nats-server's store), since
    servers that run at the same time cannot share one.
    """
    data_dir = tempfile.mkdtemp(prefix="twolane-data-")
    proc = subprocess.Popen(
        [TWOLANE, "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TWOLANE_DATA_DIR": data_dir, **(env or {})},
    )
    server = ServerProcess(proc, data_dir=Path(data_dir))
    threading.Thread(target=server._read_output, daemon=True).start()
    server.wait_listening()
    return server


async def wait_until_idle(
    stub: inference_pb2_grpc.InferenceServiceStub, timeout_s: float = 30.0
) -> inference_pb2.GetStatsResponse:
    """Poll GetStats until no request runs, waits or holds a KV block (or time runs out)."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        stats = await stub.GetStats(inference_pb2.GetStatsRequest())
        idle = stats.num_running == 0 and stats.num_waiting == 0 and stats.num_used_blocks == 0
        if idle or time.monotonic() > give_up_at:
            return stats
        await asyncio.sleep(0.05)
