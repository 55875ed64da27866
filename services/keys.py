"""API keys: the keys file, and the store a server checks keys against.

A key is `tl_` followed by 43 URL-safe characters (32 random bytes). The file keeps only
its SHA-256 (enough for random keys: there is nothing to guess), the tenant it belongs to
and the tenant's limits. It is written whole to a temporary file and renamed, under an
exclusive lock, with mode 0600, so a server reading it never sees half a file and two
`twolane keys` commands never lose each other's changes. Servers re-read it when it
changes, so a new or revoked key takes effect within `RELOAD_INTERVAL_S`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

KEY_PREFIX = "tl_"
KEY_ID_CHARS = 12
RELOAD_INTERVAL_S = 1.0
# A tenant names NATS subjects and consumers: one subject token of plain characters.
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_KEY_FORMAT = re.compile(r"tl_[A-Za-z0-9_-]{43}")


class KeysFileError(ValueError):
    """The keys file cannot be read or holds something other than keys."""


@dataclass(frozen=True)
class Limits:
    """A tenant's quotas; 0 means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    sha256: str
    tenant: str
    limits: Limits = field(default_factory=Limits)
    created_at: str = ""
    revoked_at: str = ""

    @property
    def revoked(self) -> bool:
        return bool(self.revoked_at)


def check_tenant(tenant: str) -> str:
    if not TENANT_NAME.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return tenant


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class KeysFile:
    """The keys file at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[KeyRecord]:
        """Every key in the file; an absent file holds none.

        Raises:
            KeysFileError: the file is not a keys file.
        """
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise KeysFileError(f"cannot read the keys file {self.path}: {exc}") from exc
        try:
            return [
                KeyRecord(**{**entry, "limits": Limits(**entry.get("limits", {}))})
                for entry in raw["keys"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise KeysFileError(f"{self.path} is not a twolane keys file: {exc}") from exc

    def create(self, tenant: str, limits: Limits) -> tuple[str, KeyRecord]:
        """Add a key for `tenant`; returns the key (shown once, never stored) and its record."""
        check_tenant(tenant)
        key = new_key()
        digest = key_hash(key)
        record = KeyRecord(digest[:KEY_ID_CHARS], digest, tenant, limits, _now())
        with self._locked() as records:
            # A tenant's limits live on each of its keys; a new key sets them for all.
            records[:] = [r if r.tenant != tenant else replace(r, limits=limits) for r in records]
            records.append(record)
        return key, record

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark a key revoked (kept in the file, for the record).

        Raises:
            KeyError: no key has that id.
        """
        with self._locked() as records:
            for index, record in enumerate(records):
                if record.key_id == key_id:
                    records[index] = replace(record, revoked_at=record.revoked_at or _now())
                    return records[index]
        raise KeyError(key_id)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[KeyRecord]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self.read()
            yield records
            self._write(records)

    def _write(self, records: list[KeyRecord]) -> None:
        data = json.dumps({"keys": [asdict(r) for r in records]}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@dataclass(frozen=True)
class Principal:
    """Who a call comes from."""

    tenant: str
    key_id: str
    limits: Limits = field(default_factory=Limits)


ANONYMOUS = Principal(tenant="default", key_id="-")


class KeyStore:
    """The keys a server accepts, re-read from the file when it changes.

    `authenticate` is called for every RPC, so it only compares a hash with a dict lookup
    and looks at the file's mtime at most once per `RELOAD_INTERVAL_S`.
    """

    def __init__(self, path: Path) -> None:
        self._file = KeysFile(path)
        self._lock = threading.Lock()
        self._by_hash: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked_s = 0.0
        self._reload()
        if not path.is_file():
            raise KeysFileError(f"no keys file at {path}: create one with `twolane keys create`")

    def authenticate(self, key: str | None) -> Principal | None:
        """The key's principal, or None for a missing, malformed, unknown or revoked key."""
        self._maybe_reload()
        if not key or not _KEY_FORMAT.fullmatch(key):
            return None
        record = self._by_hash.get(key_hash(key))
        if record is None or record.revoked:
            return None
        # Compare again in constant time: the dict lookup already matched on the hash.
        if not hmac.compare_digest(record.sha256, key_hash(key)):
            return None
        return Principal(record.tenant, record.key_id, record.limits)

    def tenants(self) -> dict[str, Limits]:
        """Every tenant with a key that is not revoked, and its limits."""
        self._maybe_reload()
        return {r.tenant: r.limits for r in self._by_hash.values() if not r.revoked}

    def _maybe_reload(self) -> None:
        now_s = time.monotonic()
        if now_s - self._checked_s < RELOAD_INTERVAL_S:
            return
        self._checked_s = now_s
        self._reload()

    def _reload(self) -> None:
        try:
            stat = self._file.path.stat()
        except FileNotFoundError:
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            records = self._file.read()
        except KeysFileError as exc:
            # Keep the keys we had: a broken hand edit must not lock every client out.
            log.error("keys file not reloaded", error=str(exc))
            self._stamp = stamp
            return
        with self._lock:
            self._by_hash = {r.sha256: r for r in records}
            self._stamp = stamp
