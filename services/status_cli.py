"""`twolane status`: one screen on a running server (or gateway): engine, lanes, KV
cache, the batch lane's backlog per tier, dead letters and workers."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from twolane.services.channel import Connection, add_connection_args
from twolane.services.generate_cli import describe_error
from twolane.services.grpc_server import JOBS_HEALTH_NAME, SERVICE_NAME
from twolane.v1 import inference_pb2, inference_pb2_grpc


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="a one-screen summary of a running server",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_connection_args(parser)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    with Connection.from_args(args).channel() as channel:
        try:
            stats = inference_pb2_grpc.InferenceServiceStub(channel).GetStats(
                inference_pb2.GetStatsRequest(), timeout=args.timeout
            )
            health = {name: _health(channel, name, args.timeout) for name in HEALTH_NAMES}
        except grpc.RpcError as err:
            print(describe_error(err), file=sys.stderr)
            return 1
    Console().print(render(args.target, stats, health))
    return 0


HEALTH_NAMES = (SERVICE_NAME, JOBS_HEALTH_NAME)


def _health(channel: grpc.Channel, name: str, timeout_s: float) -> str:
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        # types-grpcio-health-checking declares no methods on HealthStub; grpcio sets
        # them in __init__.
        reply = stub.Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=name), timeout=timeout_s
        )
    except grpc.RpcError as err:
        return err.code().name.lower()
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower()


def render(target: str, stats: inference_pb2.GetStatsResponse, health: dict[str, str]) -> Table:
    table = Table(title=f"twolane at {target}", show_header=False, expand=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    engine_health, jobs_health = health[SERVICE_NAME], health[JOBS_HEALTH_NAME]
    table.add_row(
        "engine",
        f"{engine_health}; model {stats.model_name or '?'}; {stats.num_workers} worker(s); "
        f"{stats.num_steps} steps",
    )
    table.add_row(
        "interactive lane",
        f"{stats.num_running_interactive} running, {stats.num_waiting_interactive} waiting",
    )
    table.add_row(
        "batch lane",
        f"{stats.num_running_batch} running, {stats.num_waiting_batch} waiting in the engine; "
        f"queue {jobs_health}",
    )
    used = stats.num_used_blocks / stats.num_total_blocks if stats.num_total_blocks else 0.0
    table.add_row(
        "KV cache",
        f"{stats.num_used_blocks} of {stats.num_total_blocks} blocks used ({used:.0%}); "
        f"prefix cache hit rate {stats.prefix_cache_hit_rate:.0%}; "
        f"{stats.num_preemptions} preemptions",
    )
    for tier in stats.backlog:
        table.add_row(
            f"backlog {tier.tier}", f"{tier.num_queued} queued, {tier.num_running} running"
        )
    table.add_row(
        "dead letters",
        f"{stats.num_dead_letters} jobs, {stats.num_webhook_dead_letters} webhook deliveries",
    )
    return table
