"""NATS users for the embedded nats-server when auth is on: one for the services, one per
tenant, each tenant's limited to its own results.

Passwords are derived from a secret kept in `<data-dir>/nats-auth/` (mode 0600), so
`twolane nats-creds --tenant NAME` can print a tenant's credentials at any time and the
server's configuration can be rewritten (and reloaded) when tenants are added, without
keeping a list of passwords. A tenant's user may:

- subscribe to `twolane.results.<tenant>.>` (its completion events as they happen);
- read its events from the TWOLANE_RESULTS stream: direct get by subject
  (`$JS.API.DIRECT.GET.TWOLANE_RESULTS.twolane.results.<tenant>.<job_id>`), or through one
  pull consumer named `<tenant>` filtered on its subjects;
- receive replies on `_INBOX_<tenant>.>` (connect with that inbox prefix);

and nothing else: no job subjects, no other tenant's results, no KV buckets, no stream
listings (which would show other tenants' subjects).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

SERVICE_USER = "twolane"
AUTH_DIR_NAME = "nats-auth"
_SECRET_FILE = "secret"
_CONFIG_FILE = "nats-server.conf"
_SERVICE_CREDS_FILE = "service.creds"
RESULTS_STREAM = "TWOLANE_RESULTS"


def auth_dir(data_dir: Path) -> Path:
    return data_dir / AUTH_DIR_NAME


def _secret(data_dir: Path, create: bool) -> bytes:
    path = auth_dir(data_dir) / _SECRET_FILE
    if not path.is_file():
        if not create:
            raise FileNotFoundError(
                f"no NATS credentials in {data_dir}: start `twolane serve --api-keys ...` "
                "with this data dir first"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, secrets.token_hex(32))
    return path.read_text().strip().encode()


def _password(secret: bytes, user: str) -> str:
    digest = hmac.new(secret, user.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def tenant_user(tenant: str) -> str:
    return f"tenant-{tenant}"


def tenant_credentials(data_dir: Path, tenant: str) -> tuple[str, str]:
    """The NATS user and password of `tenant` (raises FileNotFoundError before the first
    start with auth on)."""
    user = tenant_user(tenant)
    return user, _password(_secret(data_dir, create=False), user)


def read_credentials(path: Path) -> tuple[str, str]:
    """A credentials file: the user on the first line, the password on the second."""
    lines = path.read_text().splitlines()
    if len(lines) < 2 or not lines[0] or not lines[1]:
        raise ValueError(f"{path}: expected a NATS user and a password, one per line")
    return lines[0].strip(), lines[1].strip()


def prepare(data_dir: Path, tenants: Iterable[str]) -> tuple[Path, Path]:
    """Write the server's configuration and the services' credentials file.

    Returns:
        (nats-server configuration file, services' credentials file)
    """
    secret = _secret(data_dir, create=True)
    folder = auth_dir(data_dir)
    creds = folder / _SERVICE_CREDS_FILE
    _write_private(creds, f"{SERVICE_USER}\n{_password(secret, SERVICE_USER)}\n")
    config = folder / _CONFIG_FILE
    write_server_config(config, secret, tenants)
    return config, creds


def write_server_config(path: Path, secret: bytes, tenants: Iterable[str]) -> None:
    users = [
        {
            "user": SERVICE_USER,
            "password": _password(secret, SERVICE_USER),
            "permissions": {"publish": ">", "subscribe": ">"},
        }
    ]
    users += [
        {
            "user": tenant_user(t),
            "password": _password(secret, tenant_user(t)),
            "permissions": tenant_permissions(t),
        }
        for t in sorted(set(tenants))
    ]
    # JSON is valid nats-server configuration syntax.
    _write_private(path, json.dumps({"authorization": {"users": users}}, indent=2) + "\n")


def tenant_permissions(tenant: str) -> dict[str, dict[str, list[str]]]:
    results = f"twolane.results.{tenant}.>"
    api = f"$JS.API.CONSUMER.%s.{RESULTS_STREAM}.{tenant}"
    return {
        "publish": {
            "allow": [
                f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.{results}",
                f"$JS.API.CONSUMER.CREATE.{RESULTS_STREAM}.{tenant}.{results}",
                api % "MSG.NEXT",
                api % "INFO",
                api % "DELETE",
                f"$JS.ACK.{RESULTS_STREAM}.{tenant}.>",
            ]
        },
        "subscribe": {"allow": [results, f"_INBOX_{tenant}.>"]},
    }


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)
