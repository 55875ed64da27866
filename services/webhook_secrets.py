"""Webhook signing secrets: one per tenant (the `default` tenant when auth is off), kept
in `<data-dir>/webhook-secrets.json` with mode 0600.

A secret is `whsec_` + base64 of 32 random bytes, as the Standard Webhooks specification
writes them. The first secret of a tenant is created on first use (the webhook service
creates the default tenant's when it starts). `rotate` puts a new secret first and keeps
the old ones valid until their grace period ends: until then every delivery carries a
signature by each, so receivers can switch secrets without missing a delivery.

The file is rewritten whole (temporary file, rename) under an exclusive lock, so the
service and the `twolane webhooks secret | rotate` commands never see half a file or lose
each other's changes.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_NAME = "webhook-secrets.json"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
DEFAULT_GRACE_S = 24 * 3600.0

Table = dict[str, list[dict[str, Any]]]  # tenant -> [{"secret", "created_at", "expires_at"}]


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _live(entry: dict[str, Any], now: dt.datetime) -> bool:
    expires_at = entry.get("expires_at")
    return not expires_at or dt.datetime.fromisoformat(expires_at) > now


class WebhookSecrets:
    """The secrets file of one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE_NAME
        self._cache: tuple[tuple[int, int], Table] | None = None

    def signing_secrets(self, tenant: str) -> list[str]:
        """The tenant's secrets to sign with, newest first (created if it has none)."""
        now = _now()
        live = [e["secret"] for e in self._read().get(tenant, []) if _live(e, now)]
        return live or [self.current(tenant)]

    def current(self, tenant: str) -> str:
        """The tenant's newest secret, created if it has none."""
        entries = self._read().get(tenant)
        if entries:
            return str(entries[0]["secret"])
        with self._locked() as table:
            entries = table.setdefault(tenant, [])
            if not entries:
                entries.append({"secret": new_secret(), "created_at": _now().isoformat()})
            return str(entries[0]["secret"])

    def rotate(self, tenant: str, grace_s: float = DEFAULT_GRACE_S) -> str:
        """A new secret for `tenant`; the ones before it stay valid for `grace_s`."""
        now = _now()
        expires_at = (now + dt.timedelta(seconds=grace_s)).isoformat()
        secret = new_secret()
        with self._locked() as table:
            older = [e for e in table.get(tenant, []) if _live(e, now)]
            for entry in older:
                if not entry.get("expires_at") or entry["expires_at"] > expires_at:
                    entry["expires_at"] = expires_at
            table[tenant] = [{"secret": secret, "created_at": now.isoformat()}, *older]
        return secret

    def _read(self) -> Table:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        try:
            table: Table = json.loads(self.path.read_text())["tenants"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OSError(f"{self.path} is not a webhook secrets file: {exc}") from exc
        self._cache = (stamp, table)
        return table

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Table]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._cache = None
            table = {tenant: list(entries) for tenant, entries in self._read().items()}
            yield table
            self._write(table)

    def _write(self, table: Table) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"tenants": table}, out, indent=2)
                out.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._cache = None
