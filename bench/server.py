"""Start `twolane serve` (or a worker, or a gateway) as a subprocess on loopback, or stand
in for one already running."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT_S = 300.0
_CONSOLE_PORT = re.compile(r"\bport=(\d+)")


@dataclass
class ServerSettings:
    model_dir: Path
    dtype: str
    max_num_seqs: int
    num_blocks: int
    max_batch_inflight: int


@dataclass
class Server:
    """A running `twolane serve`: its gRPC address, its HTTP front's base URL (when it
    has one), and its data dir (where nats.url is)."""

    address: str
    http_url: str | None = None
    data_dir: Path | None = None
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def nats_url(self) -> str | None:
        if self.data_dir is None:
            return None
        url_file = self.data_dir / "nats.url"
        return url_file.read_text().strip() if url_file.is_file() else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def twolane_executable() -> str:
    beside = Path(sys.executable).with_name("twolane")
    return str(beside) if beside.exists() else "twolane"


def start_server(settings: ServerSettings) -> Server:
    """Start a server on a free port with its own embedded nats-server; wait until it listens."""
    data_dir = Path(tempfile.mkdtemp(prefix="twolane-bench-"))
    args = [
        "serve",
        "--port",
        "0",
        "--model",
        str(settings.model_dir),
        "--dtype",
        settings.dtype,
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--num-blocks",
        str(settings.num_blocks),
        "--max-waiting",
        "100000",
        "--job-max-batch-inflight",
        str(settings.max_batch_inflight),
        "--http-port",
        "0",
    ]
    return start_twolane(args, {"TWOLANE_DATA_DIR": str(data_dir)}, data_dir)


def start_twolane(
    args: list[str], env: dict[str, str] | None = None, data_dir: Path | None = None
) -> Server:
    """Start `twolane ARGS` (serve, worker or gateway) and wait for its `listening` line.
    `data_dir`, if given, is removed when the server stops."""
    proc = subprocess.Popen(
        [twolane_executable(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    server = Server(address="", data_dir=data_dir, proc=proc)
    listening = threading.Event()
    # Only a server given --http-port has an HTTP front to wait for (workers and
    # gateways never do).
    wants_http = "--http-port" in args

    def started() -> bool:
        return bool(server.address) and (bool(server.http_url) or not wants_http)

    def read_output() -> None:
        # Reading continuously keeps the pipe from filling up and blocking the server.
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)
            if "http listening" in line and (port := _port(line)):
                server.http_url = f"http://127.0.0.1:{port}"
            elif not server.address and "listening" in line and (port := _port(line)):
                server.address = f"127.0.0.1:{port}"
            if started():
                listening.set()
        listening.set()

    threading.Thread(target=read_output, daemon=True).start()
    listening.wait(STARTUP_TIMEOUT_S)
    if not started():
        server.stop()
        tail = "".join(server.lines[-20:])
        raise RuntimeError(f"twolane {args[0]} did not start listening; its output:\n{tail}")
    return server


def _port(line: str) -> int | None:
    if line.lstrip().startswith("{"):
        return int(json.loads(line)["port"])
    match = _CONSOLE_PORT.search(line)
    return int(match.group(1)) if match else None
