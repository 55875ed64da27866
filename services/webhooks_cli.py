"""`twolane webhooks serve | secret | rotate | redeliver`: the webhook service and its tools.

`serve` is the process `twolane serve` starts beside the others (see
webhook_deliverer.py); run it by hand beside a gateway and workers that share one NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import nats.errors
import structlog
from google.protobuf import json_format

from twolane.services import jetstream, jobs, nats_auth, options
from twolane.services.config import WebhookProcessConfig, default_data_dir, env_default
from twolane.services.errors import ServiceError
from twolane.services.keys import check_tenant
from twolane.services.loop_lag import watch_loop_lag
from twolane.services.nats_embedded import read_url_file
from twolane.services.process import run_process, settle_heap, signal_ready, stop_event
from twolane.services.webhook_deliverer import WebhookDeliverer
from twolane.services.webhook_metrics import WebhookMetrics
from twolane.services.webhook_secrets import DEFAULT_GRACE_S, WebhookSecrets
from twolane.services.webhook_store import DeliveryStore, StoredDelivery

log = structlog.get_logger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    webhooks = subparsers.add_parser(
        "webhooks",
        help="the webhook service, its signing secrets and redelivery",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    actions = webhooks.add_subparsers(
        dest="webhooks_command",
        metavar="ACTION",
        required=True,
        help="serve, secret, rotate or redeliver",
    )
    serve = actions.add_parser(
        "serve",
        help="(started by serve) deliver completion events to the jobs' webhook URLs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    options.add_options(serve, WebhookProcessConfig)
    serve.set_defaults(func=serve_main, runs_server=True)

    secret = actions.add_parser(
        "secret",
        help="print the signing secret receivers verify with (created if there is none)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rotate = actions.add_parser(
        "rotate",
        help="make a new signing secret and print it; the old one stays valid for --grace-s",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rotate.add_argument(
        "--grace-s",
        type=float,
        default=DEFAULT_GRACE_S,
        help="seconds deliveries stay signed with the old secret too",
    )
    for action in (secret, rotate):
        action.add_argument(
            "--tenant",
            default=jetstream.DEFAULT_TENANT,
            help="the tenant (with auth on, each has its own secret)",
        )
        _add_data_dir(action)
    secret.set_defaults(func=secret_main)
    rotate.set_defaults(func=rotate_main)

    redeliver = actions.add_parser(
        "redeliver",
        help="deliver a job's webhook again (after it failed, or again after it was delivered)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    redeliver.add_argument("job_id")
    redeliver.add_argument(
        "--nats-url",
        default=env_default("TWOLANE_NATS_URL", ""),
        help="NATS URL; unset, the one `twolane serve` wrote to --data-dir (env TWOLANE_NATS_URL)",
    )
    redeliver.add_argument(
        "--nats-creds",
        default=env_default("TWOLANE_NATS_CREDS", ""),
        help="NATS credentials file; unset, the services' own in --data-dir when auth is on",
    )
    _add_data_dir(redeliver)
    redeliver.set_defaults(func=redeliver_main)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=env_default("TWOLANE_DATA_DIR", default_data_dir()),
        help="the data dir of `twolane serve` (env TWOLANE_DATA_DIR)",
    )


# ---- serve --------------------------------------------------------------------------


def serve_main(args: argparse.Namespace) -> int:
    return run_process(
        "webhooks", args, lambda a: options.from_args(WebhookProcessConfig, a), run_webhooks
    )


async def run_webhooks(config: WebhookProcessConfig) -> None:
    """Deliver until SIGTERM or SIGINT; then attempts in flight get the grace period."""
    stop = stop_event()
    # Batch-lane bookkeeping, like the job runner's: it yields the CPU to the processes
    # that serve interactive calls (--job-niceness).
    os.nice(config.jobs.niceness)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(watch_loop_lag("webhooks", config.model_name))
        nc, store = await jobs.start_job_store(
            stack, config.jobs, jobs.shape_validator, name="twolane-webhooks", stop=stop
        )
        secrets = WebhookSecrets(Path(config.jobs.data_dir))
        try:
            # Without auth every job is the default tenant's: its secret exists from the
            # first start on, so `twolane webhooks secret` prints the one in use.
            secrets.current(jetstream.DEFAULT_TENANT)
        except OSError as exc:
            raise OSError(f"cannot keep webhook secrets in {config.jobs.data_dir}: {exc}") from exc
        deliveries = DeliveryStore(nc.jetstream(), store.buckets.webhooks)
        deliverer = WebhookDeliverer(
            nc, store, deliveries, secrets, config.webhooks, WebhookMetrics(config.model_name)
        )
        await deliverer.start()
        stack.push_async_callback(deliverer.stop, config.grace_period_s)
        settle_heap()
        signal_ready(config.child.ready_fd)
        await stop.wait()
        log.info("draining", grace_period_s=config.grace_period_s)
    log.info("stopped")


# ---- secrets ------------------------------------------------------------------------


def secret_main(args: argparse.Namespace) -> int:
    try:
        secret = WebhookSecrets(Path(args.data_dir)).current(check_tenant(args.tenant))
    except (ValueError, OSError) as exc:
        print(f"twolane webhooks secret: {exc}", file=sys.stderr)
        return 2
    print(secret)
    return 0


def rotate_main(args: argparse.Namespace) -> int:
    if args.grace_s < 0:
        print("twolane webhooks rotate: --grace-s must be >= 0", file=sys.stderr)
        return 2
    try:
        secret = WebhookSecrets(Path(args.data_dir)).rotate(check_tenant(args.tenant), args.grace_s)
    except (ValueError, OSError) as exc:
        print(f"twolane webhooks rotate: {exc}", file=sys.stderr)
        return 2
    print(secret)
    return 0


# ---- redeliver ----------------------------------------------------------------------


def redeliver_main(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    url = args.nats_url or read_url_file(data_dir)
    if not url:
        print(
            "twolane webhooks redeliver: no NATS URL: pass --nats-url, or start "
            f"`twolane serve` with the data dir {data_dir}",
            file=sys.stderr,
        )
        return 2
    creds = args.nats_creds
    if not creds and nats_auth.service_creds_path(data_dir).is_file():
        creds = str(nats_auth.service_creds_path(data_dir))
    try:
        stored = asyncio.run(redeliver(url, creds, args.job_id))
    except (ServiceError, nats.errors.Error) as exc:
        print(f"twolane webhooks redeliver: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"twolane webhooks redeliver: {exc}", file=sys.stderr)
        return 2
    status = json_format.MessageToDict(stored.record.status, preserving_proto_field_name=True)
    print(json.dumps({"job_id": args.job_id, **status}))
    return 0


async def redeliver(url: str, creds: str, job_id: str) -> StoredDelivery:
    async with contextlib.AsyncExitStack() as stack:
        nc = await jobs.connect(stack, url, "twolane-webhooks-redeliver", creds)
        js = nc.jetstream()
        bucket = await js.key_value(jetstream.WEBHOOKS_BUCKET)
        return await DeliveryStore(js, bucket).redeliver(job_id)
