"""Where the client connects and how: targets, API key, TLS, deadline, retries, NATS.

`ClientConfig.from_env()` reads the same `TWOLANE_*` variables as the CLI:

| variable | field | default |
|---|---|---|
| `TWOLANE_TARGET` | `targets` (comma-separated HOST:PORT) | `127.0.0.1:50051` |
| `TWOLANE_API_KEY` | `api_key` | none |
| `TWOLANE_TLS_CA` | `tls_ca` (PEM CA to trust) | plaintext |
| `TWOLANE_TLS_CERT`, `TWOLANE_TLS_KEY` | `tls_cert`, `tls_key` (PEM client certificate) | none |
| `TWOLANE_DEADLINE_S` | `deadline_s` | 60 |
| `TWOLANE_NATS_URL` | `nats_url` | the URL `twolane serve` wrote to the data dir |
| `TWOLANE_NATS_CREDS` | `nats_creds` (user and password, one per line) | none |
| `TWOLANE_DATA_DIR` | `data_dir` | `$XDG_DATA_HOME/twolane` or `~/.local/share/twolane` |
| `TWOLANE_TENANT` | `tenant` | from the NATS user `tenant-<name>`, else `default` |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from twolane.client.retry import RetryEvent, RetryPolicy

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TENANT = "default"
# `twolane nats-creds` names a tenant's NATS user `tenant-<name>`.
TENANT_USER_PREFIX = "tenant-"
NATS_URL_FILE = "nats.url"


@dataclass(frozen=True)
class ClientConfig:
    """Everything a `Client` or `AsyncClient` needs; build it once, share it freely.

    Attributes:
        targets: servers (HOST:PORT); calls take turns, and a retry after UNAVAILABLE
            goes to the next one.
        deadline_s: each call's deadline, retries included (None: none).
        metadata: extra gRPC metadata sent with every call.
        on_retry: called before each retry (logging, metrics).
        poll_initial_s, poll_max_s: `wait()` without NATS polls GetResult after a wait
            drawn from [0, min(poll_max_s, poll_initial_s * 2**n)].
        event_recheck_s: while `wait()` listens for the completion event, it still asks
            GetResult this often, in case the event was missed (NATS reconnecting).
        wait_on_events: False: `wait()` polls GetResult even where NATS could be reached.
    """

    targets: tuple[str, ...] = (DEFAULT_TARGET,)
    api_key: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    deadline_s: float | None = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metadata: tuple[tuple[str, str], ...] = ()
    on_retry: Callable[[RetryEvent], None] | None = None
    nats_url: str = ""
    nats_creds: str = ""
    data_dir: str = ""
    tenant: str = ""
    nats_connect_timeout_s: float = 2.0
    poll_initial_s: float = 0.05
    poll_max_s: float = 2.0
    event_recheck_s: float = 10.0
    wait_on_events: bool = True

    def __post_init__(self) -> None:
        if not self.targets or not all(self.targets):
            raise ValueError("targets needs at least one HOST:PORT")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0 or None, got {self.deadline_s}")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key needs tls_cert (the client certificate it belongs to)")
        if not 0 < self.poll_initial_s <= self.poll_max_s:
            raise ValueError("need 0 < poll_initial_s <= poll_max_s")
        if self.event_recheck_s <= 0 or self.nats_connect_timeout_s <= 0:
            raise ValueError("event_recheck_s and nats_connect_timeout_s must be > 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientConfig:
        """The configuration the `TWOLANE_*` variables describe, with `overrides` on top."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "targets": tuple(
                t.strip() for t in env.get("TWOLANE_TARGET", DEFAULT_TARGET).split(",") if t
            ),
            "api_key": env.get("TWOLANE_API_KEY", ""),
            "tls_ca": env.get("TWOLANE_TLS_CA", ""),
            "tls_cert": env.get("TWOLANE_TLS_CERT", ""),
            "tls_key": env.get("TWOLANE_TLS_KEY", ""),
            "nats_url": env.get("TWOLANE_NATS_URL", ""),
            "nats_creds": env.get("TWOLANE_NATS_CREDS", ""),
            "data_dir": env.get("TWOLANE_DATA_DIR", ""),
            "tenant": env.get("TWOLANE_TENANT", ""),
        }
        if env.get("TWOLANE_DEADLINE_S"):
            values["deadline_s"] = float(env["TWOLANE_DEADLINE_S"])
        return cls(**{**values, **overrides})

    def replace(self, **changes: Any) -> ClientConfig:
        return dataclasses.replace(self, **changes)

    # ---- gRPC ---------------------------------------------------------------------

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials when a CA or a client certificate is set; None: plaintext."""
        if not (self.tls_ca or self.tls_cert):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call sends besides its request id and trace context."""
        auth = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        return (*auth, *self.metadata)

    # ---- NATS, for wait() ---------------------------------------------------------

    def resolved_nats_url(self) -> str:
        """`nats_url`, else the URL `twolane serve` wrote to its data dir, else ''."""
        if self.nats_url:
            return self.nats_url
        path = Path(self.data_dir or default_data_dir()) / NATS_URL_FILE
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    def nats_user(self) -> tuple[str, str] | None:
        """(user, password) from `nats_creds`, None without one.

        Raises:
            ValueError: the file does not hold a user and a password.
        """
        if not self.nats_creds:
            return None
        lines = Path(self.nats_creds).read_text().splitlines()
        if len(lines) < 2 or not lines[0].strip() or not lines[1].strip():
            raise ValueError(f"{self.nats_creds}: expected a NATS user and a password")
        return lines[0].strip(), lines[1].strip()

    def resolved_tenant(self) -> str:
        """The tenant whose completion subjects `wait()` listens on."""
        if self.tenant:
            return self.tenant
        user = self.nats_user()
        if user is not None and user[0].startswith(TENANT_USER_PREFIX):
            return user[0].removeprefix(TENANT_USER_PREFIX)
        return DEFAULT_TENANT


def default_data_dir() -> str:
    """Where `twolane serve` keeps its data (and writes nats.url) by default."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "twolane")


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None
