"""Cache-aware routing against round robin on two workers, and what a gateway costs.

The workload: `--conversations` conversations run at once, each sending `--turns` turns
through GenerateStream; a turn's prompt is the previous turn's prompt, its reply and a
new user message, after one of `--system-prompts` shared system prompts (token ids, so
that a reply goes back into the next prompt exactly). It runs three times, each on fresh
workers (empty caches) and one nats-server:

1. one worker, called directly: the hit rate every placement is measured against;
2. two workers behind a gateway with `--route-policy round-robin`;
3. two workers behind a gateway with the default cache-aware routing; then, on the same
   workers, unary Generate calls one at a time, alternately straight to a worker and
   through the gateway: the gateway's added p50 latency.

Reported per run: prefix-cache hit rate (prompt tokens served from cache over prompt
tokens, from each response's usage), TTFT p50/p99, requests/s and output tokens/s, and
how the calls spread over the workers.

    make bench-routing                                # built-in model, ~3 min here
    .venv/bin/python -m twolane.bench.routing --model smollm2 --conversations 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from twolane.bench.metrics import percentile
from twolane.bench.server import Server, start_twolane
from twolane.services.nats_embedded import EmbeddedNats
from twolane.v1 import generate_pb2, inference_pb2_grpc

if TYPE_CHECKING:
    from twolane.v1.inference_pb2_grpc import InferenceServiceAsyncStub

RESULTS_DIR = Path(__file__).parent / "results"
TOKEN_ID_RANGE = 256  # ids every built-in and bench checkpoint accepts
WORKER_WAIT_S = 120.0
# Cache-aware routing on two workers should keep this share of one worker's hit rate.
HIT_RATE_TARGET = 0.9
ADDED_P50_TARGET_MS = 1.0  # what a gateway may add to a unary Generate
_REQUESTS_LINE = re.compile(r'^twolane_gateway_requests_total\{worker="([^"]+)"\} ([0-9.e+]+)$')
_SERVING_LINE = re.compile(r'^twolane_gateway_workers\{state="serving"\} ([0-9.e+]+)$')


@dataclass(frozen=True)
class Workload:
    num_conversations: int
    num_turns: int
    num_system_prompts: int
    system_tokens: int
    user_tokens: int
    output_tokens: int
    seed: int

    def system_prompts(self) -> list[list[int]]:
        rng = random.Random(self.seed)
        return [_tokens(rng, self.system_tokens) for _ in range(self.num_system_prompts)]

    def user_turns(self, conversation: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + conversation + 1)
        return [_tokens(rng, self.user_tokens) for _ in range(self.num_turns)]


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(TOKEN_ID_RANGE) for _ in range(n)]


@dataclass
class Turn:
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float = float("nan")
    error: str = ""


@dataclass
class RunResult:
    name: str
    num_workers: int
    hit_rate: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    requests_per_s: float
    output_tokens_per_s: float
    num_requests: int
    num_errors: int
    calls_by_worker: dict[str, int] = field(default_factory=dict)


async def run_conversation(
    stub: InferenceServiceAsyncStub,
    workload: Workload,
    system: list[int],
    user_turns: list[list[int]],
) -> list[Turn]:
    history = [*system, *user_turns[0]]
    params = generate_pb2.SamplingParams(
        max_tokens=workload.output_tokens, temperature=0.0, ignore_eos=True
    )
    turns: list[Turn] = []
    for n in range(workload.num_turns):
        turn = Turn()
        output: list[int] = []
        sent_s = time.perf_counter()
        try:
            request = generate_pb2.GenerateStreamRequest(prompt_token_ids=history, params=params)
            async for chunk in stub.GenerateStream(request):
                if chunk.token_ids and not output:
                    turn.ttft_s = time.perf_counter() - sent_s
                output.extend(chunk.token_ids)
                if chunk.HasField("usage"):
                    turn.num_prompt_tokens = chunk.usage.prompt_tokens
                    turn.num_cached_tokens = chunk.usage.cached_tokens
        except grpc.aio.AioRpcError as err:
            turn.error = f"{err.code().name}: {err.details()}"
        turn.num_output_tokens = len(output)
        turns.append(turn)
        if n + 1 < workload.num_turns:
            history = [*history, *output, *user_turns[n + 1]]
    return turns


async def run_workload(name: str, target: str, workload: Workload, num_workers: int) -> RunResult:
    systems = workload.system_prompts()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        started_s = time.perf_counter()
        conversations = await asyncio.gather(
            *(
                run_conversation(stub, workload, systems[i % len(systems)], workload.user_turns(i))
                for i in range(workload.num_conversations)
            )
        )
        wall_s = time.perf_counter() - started_s
    turns = [t for conversation in conversations for t in conversation]
    ok = [t for t in turns if not t.error]
    ttfts = [t.ttft_s * 1000 for t in ok]
    prompt = sum(t.num_prompt_tokens for t in ok)
    return RunResult(
        name=name,
        num_workers=num_workers,
        hit_rate=sum(t.num_cached_tokens for t in ok) / prompt if prompt else 0.0,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        requests_per_s=len(ok) / wall_s,
        output_tokens_per_s=sum(t.num_output_tokens for t in ok) / wall_s,
        num_requests=len(turns),
        num_errors=len(turns) - len(ok),
    )


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds `pid` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def gateway_overhead(
    gateway: str, workers: list[str], num_calls: int, gateway_pid: int
) -> dict[str, float | int]:
    """Unary Generate one call at a time, alternately to a worker and via the gateway.

    Besides the latencies, the gateway's CPU time per call: what it costs whatever
    else runs on the machine (on a busy machine the latency also holds the waits for a
    core, at each of the gateway's two hops)."""
    request = generate_pb2.GenerateRequest(
        prompt_token_ids=[1, 2, 3, 4, 5, 6, 7, 8],
        params=generate_pb2.SamplingParams(max_tokens=1, ignore_eos=True),
    )
    direct_ms: list[float] = []
    via_ms: list[float] = []
    channels = [grpc.aio.insecure_channel(a) for a in [gateway, *workers]]
    try:
        stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
        via, direct = stubs[0], stubs[1:]
        for _ in range(10):  # connections up, code paths warm
            await via.Generate(request)
            for stub in direct:
                await stub.Generate(request)
        cpu_before_s = process_cpu_s(gateway_pid)
        for i in range(num_calls):
            pair = [(direct[i % len(direct)], direct_ms), (via, via_ms)]
            for stub, into in pair if i % 2 == 0 else reversed(pair):
                started_s = time.perf_counter()
                await stub.Generate(request)
                into.append((time.perf_counter() - started_s) * 1000)
        gateway_cpu_ms = (process_cpu_s(gateway_pid) - cpu_before_s) * 1000 / num_calls
    finally:
        for channel in channels:
            await channel.close()
    direct_p50, via_p50 = percentile(direct_ms, 50), percentile(via_ms, 50)
    return {
        "num_calls": num_calls,
        "direct_p50_ms": direct_p50,
        "gateway_p50_ms": via_p50,
        "added_p50_ms": via_p50 - direct_p50,
        "direct_p99_ms": percentile(direct_ms, 99),
        "gateway_p99_ms": percentile(via_ms, 99),
        "gateway_cpu_ms_per_call": gateway_cpu_ms,
    }


@dataclass
class Fleet:
    """Worker and gateway processes of one run, stopped together."""

    nats_url: str
    worker_args: list[str]
    processes: list[Server] = field(default_factory=list)
    metrics_port: int = 0

    def worker(self, env: dict[str, str]) -> Server:
        args = ["worker", "--port", "0", "--nats-url", self.nats_url, *self.worker_args]
        server = start_twolane(args, env)
        self.processes.append(server)
        return server

    def gateway(self, policy: str) -> Server:
        self.metrics_port = _free_port()
        args = [
            "gateway",
            "--port",
            "0",
            "--nats-url",
            self.nats_url,
            "--route-policy",
            policy,
            "--metrics-port",
            str(self.metrics_port),
        ]
        server = start_twolane(args)
        self.processes.append(server)
        return server

    def stop(self) -> None:
        for server in reversed(self.processes):
            server.stop()
        self.processes.clear()

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text: str = reply.read().decode()
        return text

    async def wait_serving(self, num_workers: int) -> None:
        give_up_s = time.monotonic() + WORKER_WAIT_S
        while time.monotonic() < give_up_s:
            for line in self.scrape().splitlines():
                match = _SERVING_LINE.match(line)
                if match and float(match.group(1)) >= num_workers:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the gateway did not see {num_workers} serving workers")

    def calls_by_worker(self) -> dict[str, int]:
        calls: dict[str, int] = {}
        for line in self.scrape().splitlines():
            match = _REQUESTS_LINE.match(line)
            if match:
                calls[match.group(1)] = int(float(match.group(2)))
        return calls


@contextlib.contextmanager
def fleet(nats_url: str, worker_args: list[str]) -> Iterator[Fleet]:
    running = Fleet(nats_url, worker_args)
    try:
        yield running
    finally:
        running.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run(args: argparse.Namespace) -> dict[str, object]:
    workload = Workload(
        num_conversations=args.conversations,
        num_turns=args.turns,
        num_system_prompts=args.system_prompts,
        system_tokens=args.system_tokens,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        seed=args.seed,
    )
    worker_args = ["--model", args.model, "--max-waiting", "100000"]
    env = {"TWOLANE_THREADS": str(args.threads)} if args.threads else {}
    store = Path(tempfile.mkdtemp(prefix="twolane-bench-routing-"))
    nats = EmbeddedNats(store)
    nats_url = await nats.start()
    runs: list[RunResult] = []
    overhead: dict[str, float | int] = {}
    try:
        with fleet(nats_url, worker_args) as one:
            worker = one.worker(env)
            runs.append(await run_workload("one worker (direct)", worker.address, workload, 1))
            print(_row(runs[-1]), flush=True)
        for policy in ("round-robin", "cache-aware"):
            with fleet(nats_url, worker_args) as two:
                workers = [two.worker(env), two.worker(env)]
                gateway = two.gateway(policy)
                await two.wait_serving(2)
                result = await run_workload(f"2 workers, {policy}", gateway.address, workload, 2)
                result.calls_by_worker = two.calls_by_worker()
                runs.append(result)
                print(_row(result), flush=True)
                if policy == "cache-aware":
                    assert gateway.proc is not None
                    overhead = await gateway_overhead(
                        gateway.address,
                        [w.address for w in workers],
                        args.latency_calls,
                        gateway.proc.pid,
                    )
    finally:
        await nats.stop()
        shutil.rmtree(store, ignore_errors=True)
    single = runs[0].hit_rate
    return {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "workload": asdict(workload),
        "model": args.model,
        "runs": [asdict(r) for r in runs],
        "hit_rate_vs_one_worker": {r.name: r.hit_rate / single if single else 0.0 for r in runs},
        "gateway_overhead": overhead,
        "cpu_count": os.cpu_count(),
    }


def _row(r: RunResult) -> str:
    spread = " / ".join(str(n) for n in sorted(r.calls_by_worker.values())) or "-"
    return (
        f"| {r.name} | {r.hit_rate:.1%} | {r.ttft_p50_ms:.1f} / {r.ttft_p99_ms:.1f} | "
        f"{r.requests_per_s:.2f} | {r.output_tokens_per_s:.0f} | {spread} | {r.num_errors} |"
    )


def print_report(report: dict[str, object]) -> None:
    runs = [RunResult(**r) for r in report["runs"]]  # type: ignore[attr-defined]
    print()
    print(
        "| run | prefix-cache hit rate | TTFT p50 / p99 ms | req/s | out tok/s "
        "| calls per worker | errors |"
    )
    print("|---|---:|---|---:|---:|---|---:|")
    for r in runs:
        print(_row(r))
    ratios = report["hit_rate_vs_one_worker"]
    load = report.get("load_average")
    if load:
        print(f"\nload average at the end (1, 5, 15 min): {load}")  # a shared machine's
    print()
    for name, ratio in ratios.items():  # type: ignore[attr-defined]
        print(f"hit rate of {name} / one worker's: {ratio:.1%}")
    cache_aware = ratios.get("2 workers, cache-aware", 0.0)  # type: ignore[attr-defined]
    verdict = "met" if cache_aware >= HIT_RATE_TARGET else "NOT met"
    print(f"target: cache-aware >= {HIT_RATE_TARGET:.0%} of one worker's hit rate: {verdict}")
    overhead = report["gateway_overhead"]
    if overhead:
        print(
            "unary Generate p50: direct {direct_p50_ms:.2f} ms, via the gateway "
            "{gateway_p50_ms:.2f} ms: the gateway adds {added_p50_ms:.2f} ms "
            "({num_calls} calls each); the gateway's CPU per call: "
            "{gateway_cpu_ms_per_call:.2f} ms".format(**overhead)  # type: ignore[arg-type]
        )
        added_ms = float(overhead["added_p50_ms"])  # type: ignore[index]
        verdict = "met" if added_ms <= ADDED_P50_TARGET_MS else "NOT met"
        print(f"target: the gateway adds <= {ADDED_P50_TARGET_MS:g} ms p50: {verdict}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="builtin", help="the workers' --model (default: the built-in one)")
    add("--conversations", type=int, default=16, help="conversations at once")
    add("--turns", type=int, default=6, help="turns per conversation")
    add("--system-prompts", type=int, default=4, help="system prompts the conversations share")
    add("--system-tokens", type=int, default=256, help="tokens of a system prompt")
    add("--user-tokens", type=int, default=64, help="tokens of a user message")
    add("--output-tokens", type=int, default=32, help="tokens of a reply")
    add("--latency-calls", type=int, default=300, help="unary calls each way for the overhead")
    add("--threads", type=int, default=1, help="torch threads per engine core (0: default)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=None, help="report JSON (default: bench/results/...)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print_report(report)
    out = args.out or RESULTS_DIR / f"routing-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
