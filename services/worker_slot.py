"""A job worker's identity, kept across restarts on one data dir, and the messages it holds.

A worker that dies leaves the job messages it had pulled unacked: JetStream would hand
them out again only after the consumer's ack wait (30 s by default). So a worker notes
each message it holds (its ack reply subject and job id) in its slot's file, and the
next worker to take the slot (the same worker restarted, on the same data dir) starts by
giving those messages back at once, with a NAK to each reply subject.

Live workers never share an identity: each holds a lock on its own slot
(`<data-dir>/job-workers/<n>.lock`, the first one free), and the identity of slot n is
made once and kept in `<n>.id`. A worker killed by SIGKILL drops its lock with its
process, so its restart takes the same slot again.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SLOTS_DIR = "job-workers"
# The held file is an append-only log of "+ reply job_id" and "- reply" lines; past this
# many lines it is rewritten with just the messages still held.
COMPACT_AFTER_LINES = 4096


@dataclass(frozen=True)
class HeldMessage:
    reply_subject: str
    job_id: str


class WorkerSlot:
    """One worker's identity and its record of held job messages; see the module doc."""

    def __init__(self, directory: Path, index: int, lock_file: IO[str], worker_id: str) -> None:
        self.worker_id = worker_id
        self._lock_file = lock_file
        self._held_path = directory / f"{index}.held"
        self._held: dict[str, str] = {}  # reply subject -> job id
        self._num_lines = 0
        self._log: IO[str] | None = None

    @classmethod
    def acquire(cls, data_dir: Path) -> WorkerSlot:
        """Lock the first free slot under `data_dir` and take its identity."""
        directory = data_dir / SLOTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        for index in itertools.count():
            lock_file = (directory / f"{index}.lock").open("a+")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.close()
                continue
            return cls(directory, index, lock_file, _identity(directory / f"{index}.id"))
        raise AssertionError("unreachable")

    def take_previous(self) -> list[HeldMessage]:
        """The messages the slot's previous holder still held when it stopped; the record
        starts afresh."""
        held: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self._held_path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "+":
                    held[parts[1]] = "" if parts[2] == "-" else parts[2]
                elif len(parts) == 2 and parts[0] == "-":
                    held.pop(parts[1], None)
                # Anything else is a line cut short by a crash: ignored.
        self._rewrite()
        return [HeldMessage(reply, job_id) for reply, job_id in held.items()]

    def hold(self, reply_subject: str, job_id: str) -> None:
        self._held[reply_subject] = job_id
        self._append(f"+ {reply_subject} {job_id or '-'}\n")

    def release(self, reply_subject: str) -> None:
        if self._held.pop(reply_subject, None) is not None:
            self._append(f"- {reply_subject}\n")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._lock_file.close()

    def _append(self, line: str) -> None:
        if self._num_lines >= COMPACT_AFTER_LINES:
            self._rewrite()
        assert self._log is not None, "take_previous() opens the record"
        # A whole line per write, unbuffered: a killed process leaves every line but
        # perhaps its last, which reading skips.
        self._log.write(line)
        self._num_lines += 1

    def _rewrite(self) -> None:
        """Replace the file with the messages held now (atomically), and append from there."""
        if self._log is not None:
            self._log.close()
        temporary = self._held_path.with_suffix(".held.tmp")
        temporary.write_text("".join(f"+ {r} {j or '-'}\n" for r, j in self._held.items()))
        os.replace(temporary, self._held_path)
        self._log = self._held_path.open("a", buffering=1)
        self._num_lines = len(self._held)


def _identity(path: Path) -> str:
    """The slot's identity: read, or made once (host name and a random part) and kept."""
    with contextlib.suppress(FileNotFoundError):
        worker_id = path.read_text().strip()
        if worker_id:
            return worker_id
    worker_id = f"{socket.gethostname()}-{secrets.token_hex(4)}"
    temporary = path.with_suffix(".id.tmp")
    temporary.write_text(worker_id + "\n")
    os.replace(temporary, path)
    return worker_id
