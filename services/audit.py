"""The audit log: one JSON line per job operation (submit, cancel, result read).

Each line records when, which tenant and key id, which job and the outcome; never the
key itself, never a prompt or an output. Several processes append to one file: each line
is a single `write` on a file opened with O_APPEND, which the kernel keeps whole.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from twolane.services.keys import Principal

MAX_FIELD_CHARS = 128  # an id longer than any real one is cut, not echoed whole


class AuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, operation: str, principal: Principal, job_id: str, outcome: str) -> None:
        line = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "operation": operation,
            "tenant": principal.tenant,
            "key_id": principal.key_id,
            "job_id": job_id[:MAX_FIELD_CHARS],
            "outcome": outcome[:MAX_FIELD_CHARS],
        }
        os.write(self._fd, (json.dumps(line) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)
