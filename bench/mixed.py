"""Two lanes, one engine: interactive latency with and without a batch backlog.

1. Capacity: the interactive lane alone at saturation (output tokens/s, requests/s).
2. Alone: a Poisson stream of interactive requests at `--load` of that capacity.
3. Mixed: the same stream while at least `--num-jobs` batch jobs wait in JetStream.

Reports interactive TTFT p50/p99 in both runs and their ratio, the batch lane's
output tokens/s during the mixed run as a share of the capacity the interactive lane
leaves, and whether every job completed exactly once.

    make bench-mixed                                   # wide bench model, ~6 min
    .venv/bin/python -m twolane.bench.mixed --model builtin --window-s 20
    .venv/bin/python -m twolane.bench.mixed --model small --submit-during --window-s 40
    .venv/bin/python -m twolane.bench.mixed --model builtin --quick
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
from nats.aio.msg import Msg

from twolane.bench.batch_lane import job_request
from twolane.bench.checkpoints import model_dir
from twolane.bench.interactive import run_interactive
from twolane.bench.server import ServerSettings, start_server
from twolane.bench.workload import LengthRange, RequestSpec, random_workload
from twolane.v1 import inference_pb2_grpc, jobs_pb2

RESULTS_DIR = Path(__file__).parent / "results"
VOCAB_SIZE = 256  # ids every built-in and bench checkpoint accepts
SUBMIT_CONCURRENCY = 64
SUBMIT_DURING_DELAY_S = 5.0
CAPACITY_REQUESTS_PER_SEQ = 8
# Saturated runs the capacity is the median of: one short run on a shared machine can come
# out 30% off, and both the interactive rate and the batch share are read against it.
CAPACITY_RUNS = 3


@dataclass
class JobWatch:
    """Completion events as they arrive, with their arrival time and token counts."""

    wanted: set[str] = field(default_factory=set)
    events: dict[str, tuple[float, int, int]] = field(
        default_factory=dict
    )  # id -> (t, tokens, state)
    num_duplicate_events: int = 0

    def on_event(self, event: jobs_pb2.JobEvent) -> None:
        if not event.custom_id.startswith("mixed-"):
            return
        if event.job_id in self.events:
            self.num_duplicate_events += 1
            return
        tokens = event.result.usage.completion_tokens
        self.events[event.job_id] = (time.perf_counter(), tokens, event.state)

    def tokens_between(self, start_s: float, end_s: float) -> int:
        return sum(tok for t, tok, _ in self.events.values() if start_s <= t < end_s)

    @property
    def num_pending(self) -> int:
        return len(self.wanted - self.events.keys())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="wide",
        help="wide (default: a step's cost is the model's), small (hidden 256, 4 layers: "
        "steps of a few ms) or builtin (a tiny model, whose steps cost mostly Python)",
    )
    parser.add_argument(
        "--submit-during",
        action="store_true",
        help="submit the jobs 5 s into the interactive run instead of before it, so their "
        "SubmitJob calls and first steps fall inside the measured window",
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--num-blocks", type=int, default=2048)
    parser.add_argument("--load", type=float, default=0.3, help="interactive share of capacity")
    parser.add_argument("--num-jobs", type=int, default=500, help="at least this many jobs")
    parser.add_argument(
        "--window-s",
        type=float,
        default=120.0,
        help="interactive run length (at 30%% load the wide model gets ~170 requests)",
    )
    parser.add_argument("--prompt-lens", type=LengthRange.parse, default=LengthRange(16, 64))
    parser.add_argument("--output-lens", type=LengthRange.parse, default=LengthRange(32, 64))
    parser.add_argument(
        "--ttft-target-s",
        type=float,
        default=None,
        help="the server's --interactive-ttft-target-s (default: the server's own default)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's --threads; the tiny built-in model runs fastest on one",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run that checks the plumbing")
    parser.add_argument("--out", type=Path, default=None, help="JSON report path")


async def _mixed_phase(
    client: Executor,
    address: str,
    nats_url: str,
    args: argparse.Namespace,
    rate: float,
    num_interactive: int,
    num_jobs: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    watch = JobWatch()
    job_specs = random_workload(
        num_jobs, args.prompt_lens, args.output_lens, VOCAB_SIZE, args.seed + 7
    )
    nc = await nats.connect(nats_url)
    try:

        async def on_event(msg: Msg) -> None:
            watch.on_event(jobs_pb2.JobEvent.FromString(msg.data))

        await nc.subscribe("twolane.results.>", cb=on_event)
        await nc.flush()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            requests = []
            for i, spec in enumerate(job_specs):
                req = job_request(spec, i)
                req.custom_id = f"mixed-{i}"
                req.tier = (jobs_pb2.JOB_TIER_STANDARD, jobs_pb2.JOB_TIER_BULK)[i % 2]
                requests.append(req)
            limit = asyncio.Semaphore(SUBMIT_CONCURRENCY)

            async def submit(request: jobs_pb2.SubmitJobRequest) -> str:
                async with limit:
                    return (await stub.SubmitJob(request)).job_id

            if not args.submit_during:
                watch.wanted.update(await asyncio.gather(*(submit(r) for r in requests)))
                # Let the batch lane reach its steady state before interactive traffic starts.
                await asyncio.sleep(2.0)
            start = time.perf_counter()
            interactive_run = asyncio.get_running_loop().run_in_executor(
                client,
                run_interactive,
                address,
                _interactive_specs(args, num_interactive),
                10_000,
                rate,
                args.seed,
                "interactive + batch",
            )
            if args.submit_during:
                await asyncio.sleep(SUBMIT_DURING_DELAY_S)
                watch.wanted.update(await asyncio.gather(*(submit(r) for r in requests)))
            interactive = await interactive_run
            end = time.perf_counter()
            pending_at_end = watch.num_pending
            deadline = time.monotonic() + 1800
            while watch.num_pending and time.monotonic() < deadline:
                await asyncio.sleep(0.2)

            async def result(job_id: str) -> jobs_pb2.GetResultResponse:
                async with limit:
                    return await stub.GetResult(jobs_pb2.GetResultRequest(job_id=job_id))

            states = await asyncio.gather(*(result(j) for j in watch.wanted))
    finally:
        await nc.close()
    window_s = end - start
    batch = {
        "num_jobs": num_jobs,
        "num_succeeded": sum(1 for s in states if s.state == jobs_pb2.JOB_STATE_SUCCEEDED),
        "num_events": len(watch.events),
        "num_duplicate_events": watch.num_duplicate_events,
        "num_pending_at_window_end": pending_at_end,
        "window_s": window_s,
        "output_tokens_per_s": watch.tokens_between(start, end) / window_s,
    }
    return interactive, batch


def _interactive_specs(args: argparse.Namespace, num: int) -> list[RequestSpec]:
    return random_workload(num, args.prompt_lens, args.output_lens, VOCAB_SIZE, args.seed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.num_jobs, args.window_s = min(args.num_jobs, 60), min(args.window_s, 4.0)
    settings = ServerSettings(
        model_dir=model_dir(args.model),
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        num_blocks=args.num_blocks,
        max_batch_inflight=args.max_num_seqs,
    )
    os.environ["TWOLANE_THREADS"] = str(args.threads)
    if args.ttft_target_s is not None:
        # The server takes every flag from its TWOLANE_* environment variable too.
        os.environ["TWOLANE_INTERACTIVE_TTFT_TARGET_S"] = str(args.ttft_target_s)
    # The interactive client runs in a process of its own, so that in the mixed run it
    # does not share an interpreter with this one's handling of job events.
    client = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with client, start_server(settings) as server:
        assert server.nats_url, "the server did not start its embedded nats-server"
        saturations = [
            client.submit(
                run_interactive,
                server.address,
                # Enough requests that each saturated run lasts seconds, not one burst: the
                # interactive rate of both runs is a share of their median.
                _interactive_specs(args, CAPACITY_REQUESTS_PER_SEQ * args.max_num_seqs),
                args.max_num_seqs,
                label=f"capacity {i + 1}/{CAPACITY_RUNS}",
            ).result()
            for i in range(1 if args.quick else CAPACITY_RUNS)
        ]
        saturations.sort(key=lambda run: float(run["output_tokens_per_s"]))  # type: ignore[arg-type]
        saturation = saturations[len(saturations) // 2]
        capacity_tok_s = float(saturation["output_tokens_per_s"])  # type: ignore[arg-type]
        capacity_req_s = float(saturation["request_throughput_per_s"])  # type: ignore[arg-type]
        rate = args.load * capacity_req_s
        num_interactive = max(20, int(rate * args.window_s))
        alone = client.submit(
            run_interactive,
            server.address,
            _interactive_specs(args, num_interactive),
            10_000,
            rate,
            args.seed,
            "interactive alone",
        ).result()
        # Enough jobs that the backlog outlasts the interactive run, and never fewer than asked.
        mean_job_tokens = (args.output_lens.low + args.output_lens.high) / 2
        backlog_jobs = int(1.5 * capacity_tok_s * args.window_s / mean_job_tokens)
        num_jobs = max(args.num_jobs, backlog_jobs)
        mixed, batch = asyncio.run(
            _mixed_phase(
                client, server.address, server.nats_url, args, rate, num_interactive, num_jobs
            )
        )
    spare_tok_s = capacity_tok_s - float(mixed["output_tokens_per_s"])
    ttft_alone, ttft_mixed = alone["ttft_s"], mixed["ttft_s"]
    return {
        "date": dt.date.today().isoformat(),
        "model": args.model,
        "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs,
        "load": args.load,
        "ttft_target_s": args.ttft_target_s,
        "submit_during": args.submit_during,
        "threads": args.threads,
        "capacity": {
            "output_tokens_per_s": capacity_tok_s,
            "requests_per_s": capacity_req_s,
            "runs_output_tokens_per_s": [float(r["output_tokens_per_s"]) for r in saturations],  # type: ignore[arg-type]
        },
        "interactive_rate_per_s": rate,
        "alone": alone,
        "mixed": mixed,
        "batch": batch,
        "ttft_p50_ratio": ttft_mixed["p50"] / ttft_alone["p50"],  # type: ignore[index]
        "ttft_p99_ratio": ttft_mixed["p99"] / ttft_alone["p99"],  # type: ignore[index]
        "spare_output_tokens_per_s": spare_tok_s,
        "batch_share_of_spare": batch["output_tokens_per_s"] / spare_tok_s,
        "jobs_lost": num_jobs - batch["num_succeeded"],
    }


def table(report: dict[str, Any]) -> str:
    alone, mixed, batch = report["alone"], report["mixed"], report["batch"]

    def ms(v: float) -> str:
        return f"{v * 1000:.1f}"

    rows = [
        f"# twolane mixed lanes — {report['date']}, model {report['model']} ({report['dtype']}), "
        f"max_num_seqs {report['max_num_seqs']}, interactive TTFT target "
        f"{report['ttft_target_s'] or 'default'} s"
        + (", jobs submitted during the run" if report.get("submit_during") else ""),
        "",
        f"capacity (interactive alone, saturated; median of "
        f"{', '.join(f'{v:.0f}' for v in report['capacity']['runs_output_tokens_per_s'])}): "
        f"{report['capacity']['output_tokens_per_s']:.0f}"
        f" tok/s, {report['capacity']['requests_per_s']:.2f} req/s; interactive Poisson rate "
        f"{report['interactive_rate_per_s']:.2f} req/s ({report['load']:.0%} of capacity)",
        "",
        "| run | requests | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | interactive tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("interactive alone", alone), ("interactive + batch backlog", mixed)):
        rows.append(
            f"| {name} | {run['num_completed']}/{run['num_requests']} | {ms(run['ttft_s']['p50'])} "
            f"| {ms(run['ttft_s']['p99'])} | {ms(run['tpot_s']['p50'])} "
            f"| {run['output_tokens_per_s']:.0f} |"
        )
    rows += [
        "",
        f"TTFT p50 ratio {report['ttft_p50_ratio']:.2f}, "
        f"**p99 ratio {report['ttft_p99_ratio']:.2f}** (target <= 1.25)",
        f"batch lane during the mixed run: {batch['output_tokens_per_s']:.0f} tok/s of "
        f"{report['spare_output_tokens_per_s']:.0f} spare = "
        f"**{report['batch_share_of_spare']:.0%}** (target >= 80%)",
        f"jobs: {batch['num_jobs']} submitted, {batch['num_succeeded']} succeeded, "
        f"{batch['num_events']} events, {batch['num_duplicate_events']} duplicate events, "
        f"{batch['num_pending_at_window_end']} still queued when the interactive run ended, "
        f"**{report['jobs_lost']} lost**",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    out = args.out or RESULTS_DIR / f"mixed-{report['model']}-{report['dtype']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0 if report["jobs_lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
