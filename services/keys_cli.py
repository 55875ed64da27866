"""`twolane keys create | list | revoke`: manage the API keys a server with --api-keys accepts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twolane.services.config import default_data_dir, env_default
from twolane.services.keys import KeysFile, KeysFileError, Limits, check_tenant
from twolane.services.nats_auth import tenant_credentials


def default_keys_file() -> str:
    return str(Path(env_default("TWOLANE_DATA_DIR", default_data_dir())) / "keys.json")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    actions = keys.add_subparsers(
        dest="keys_command", metavar="ACTION", required=True, help="what to do with the keys"
    )
    create = actions.add_parser(
        "create",
        help="add a key for a tenant and print it (only the key, on stdout)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    create.add_argument("--tenant", required=True, help="the tenant the key belongs to")
    create.add_argument("--requests-per-minute", type=int, default=0, help="0: no limit")
    create.add_argument(
        "--tokens-per-minute",
        type=int,
        default=0,
        help="prompt plus max_tokens per minute, settled on finish; 0: no limit",
    )
    create.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="interactive streams plus running jobs at once; 0: no limit",
    )
    create.set_defaults(func=create_main)
    listing = actions.add_parser(
        "list", help="show every key's id, tenant, limits and state (never the key)"
    )
    listing.set_defaults(func=list_main)
    revoke = actions.add_parser("revoke", help="revoke a key by its id (servers stop taking it)")
    revoke.add_argument("key_id", help="the id `twolane keys list` shows")
    revoke.set_defaults(func=revoke_main)
    register_nats_creds(subparsers)
    for action in (create, listing, revoke):
        action.add_argument(
            "--keys-file",
            default=env_default("TWOLANE_API_KEYS", default_keys_file()),
            help="the keys file (env TWOLANE_API_KEYS; default <data-dir>/keys.json)",
        )


def register_nats_creds(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    creds = subparsers.add_parser(
        "nats-creds",
        help="print a tenant's NATS user and password, one per line",
        description="The NATS credentials of a tenant of the embedded nats-server (auth on): "
        "they may subscribe to twolane.results.<tenant>.> and read the tenant's events from "
        "TWOLANE_RESULTS, and nothing else.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    creds.add_argument("--tenant", required=True, help="the tenant whose credentials to print")
    creds.add_argument(
        "--data-dir",
        default=env_default("TWOLANE_DATA_DIR", default_data_dir()),
        help="the data dir of the `twolane serve` that runs nats-server (env TWOLANE_DATA_DIR)",
    )
    creds.set_defaults(func=nats_creds_main)


def nats_creds_main(args: argparse.Namespace) -> int:
    try:
        user, password = tenant_credentials(Path(args.data_dir), check_tenant(args.tenant))
    except (ValueError, OSError) as exc:
        print(f"twolane nats-creds: {exc}", file=sys.stderr)
        return 2
    print(user)
    print(password)
    return 0


def create_main(args: argparse.Namespace) -> int:
    try:
        limits = Limits(args.requests_per_minute, args.tokens_per_minute, args.max_concurrent)
        key, _ = KeysFile(Path(args.keys_file)).create(args.tenant, limits)
    except (ValueError, OSError) as exc:
        print(f"twolane keys create: {exc}", file=sys.stderr)
        return 2
    print(key)
    return 0


def list_main(args: argparse.Namespace) -> int:
    try:
        records = KeysFile(Path(args.keys_file)).read()
    except KeysFileError as exc:
        print(f"twolane keys list: {exc}", file=sys.stderr)
        return 2
    print(f"{'KEY ID':14} {'TENANT':20} {'RPM':>7} {'TPM':>9} {'CONC':>5}  CREATED  STATE")
    for r in records:
        state = f"revoked {r.revoked_at}" if r.revoked else "active"
        limits = r.limits
        print(
            f"{r.key_id:14} {r.tenant:20} {limits.requests_per_minute:>7} "
            f"{limits.tokens_per_minute:>9} {limits.max_concurrent:>5}  {r.created_at}  {state}"
        )
    return 0


def revoke_main(args: argparse.Namespace) -> int:
    try:
        record = KeysFile(Path(args.keys_file)).revoke(args.key_id)
    except KeyError:
        print(f"twolane keys revoke: no key with id {args.key_id!r}", file=sys.stderr)
        return 1
    except (KeysFileError, OSError) as exc:
        print(f"twolane keys revoke: {exc}", file=sys.stderr)
        return 2
    print(f"revoked {record.key_id} (tenant {record.tenant})", file=sys.stderr)
    return 0
