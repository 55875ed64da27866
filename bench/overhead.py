"""What serving costs outside the model: a served decode step against the bare forward.

    make bench-overhead       # wide model, bf16, 64 streams decoding, about 3 minutes
    .venv/bin/python -m twolane.bench.overhead --model builtin --dtype float32 --quick

In one run:

1. Bare: an `EngineCore` in a process of its own, with the server's settings, decodes
   `--batch` sequences of `--context` prompt tokens; the runner reports how long each
   step's forward pass and sampling took (its prepare, forward and sample timings).
2. Served: `twolane serve` on the same model, `--batch` GenerateStream calls from a
   client process; over a window of steady decoding, the served step time is the wall
   time between engine steps (GetStats' step counter), and the engine core's own phase
   histograms say where each step's time went.

The overhead is the served step time minus the bare forward + sample time, as a share
of the served step: everything serving adds (scheduling, inputs, outputs, sockets, and
whatever the frontends and the client take from the core's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from twolane.bench.checkpoints import model_dir
from twolane.bench.server import ServerSettings, start_server
from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc

RESULTS_DIR = Path(__file__).parent / "results"
PHASES = ("schedule", "prepare", "forward", "sample", "postprocess", "send", "commands")
_PHASE_SUM = re.compile(
    r'^twolane_engine_step_phase_seconds_sum\{[^}]*phase="(\w+)"[^}]*\} (\S+)$', re.M
)
_PHASE_COUNT = re.compile(
    r'^twolane_engine_step_phase_seconds_count\{[^}]*phase="(\w+)"[^}]*\} (\S+)$', re.M
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="wide", help="wide (default), builtin, or a checkpoint directory")
    add("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    add("--batch", type=int, default=64, help="sequences decoding together")
    add("--context", type=int, default=128, help="prompt tokens per sequence")
    add("--steps", type=int, default=24, help="decode steps timed in each part")
    add(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the engine, bare and served alike (the frontend and the "
        "client need the other core of a 2-core machine)",
    )
    add("--quick", action="store_true", help="few steps: checks the plumbing")
    add("--out", type=Path, default=None, help="JSON report path")


def _prompts(batch: int, context: int, vocab_size: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % vocab_size for j in range(context)] for i in range(batch)]


def measure_bare(
    checkpoint: str, dtype: str, batch: int, context: int, steps: int, threads: int
) -> dict[str, float]:
    """Mean seconds per decode step: the runner's forward + sample, and the whole step."""
    import torch

    from twolane.scheduler.config import EngineConfig
    from twolane.scheduler.engine import EngineCore
    from twolane.scheduler.protocol import AddRequest
    from twolane.scheduler.request import Priority, SamplingParams

    torch.set_num_threads(threads)
    config = EngineConfig(
        model=checkpoint,
        dtype=dtype,
        max_num_seqs=batch,
        num_blocks=_num_blocks(batch, context, steps),
        enable_prefix_caching=False,
    )
    engine = EngineCore(config)
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for i, prompt in enumerate(_prompts(batch, context, engine.vocab_size)):
        engine.add_request(
            AddRequest(f"bare-{i}", prompt, params, Priority.INTERACTIVE, time.monotonic())
        )
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    engine.step()  # one untimed decode

    def phase_sum(phase: str) -> float:
        name = "twolane_engine_step_phase_seconds_sum"
        labels = {"phase": phase, "model_name": engine.metrics.model_name}
        return engine.metrics.registry.get_sample_value(name, labels) or 0.0

    before = {phase: phase_sum(phase) for phase in ("forward", "sample")}
    started_s = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return {
        "step_s": (time.perf_counter() - started_s) / steps,
        "forward_s": (phase_sum("forward") - before["forward"]) / steps,
        "sample_s": (phase_sum("sample") - before["sample"]) / steps,
    }


def _drive_streams(address: str, batch: int, context: int, max_tokens: int, vocab: int) -> int:
    """The client process: `batch` streams at once; returns the tokens received."""

    async def run() -> int:
        options = [("grpc.max_concurrent_streams", 0)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            params = generate_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)

            async def one(prompt: list[int]) -> int:
                request = generate_pb2.GenerateStreamRequest(prompt_token_ids=prompt, params=params)
                return sum([len(c.token_ids) async for c in stub.GenerateStream(request)])

            counts = await asyncio.gather(*(one(p) for p in _prompts(batch, context, vocab)))
            return sum(counts)

    return asyncio.run(run())


def _scrape_phases(metrics_url: str) -> dict[str, tuple[float, float]]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    sums = {m[0]: float(m[1]) for m in _PHASE_SUM.findall(text)}
    counts = {m[0]: float(m[1]) for m in _PHASE_COUNT.findall(text)}
    return {phase: (sums.get(phase, 0.0), counts.get(phase, 0.0)) for phase in PHASES}


def measure_served(
    checkpoint: str, dtype: str, batch: int, context: int, steps: int, vocab: int
) -> dict[str, object]:
    settings = ServerSettings(Path(checkpoint), dtype, batch, _num_blocks(batch, context, steps), 0)
    os.environ["TWOLANE_METRICS_PORT"] = "0"
    client = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with client, start_server(settings) as server:
        metrics_port = next(
            int(m.group(1))
            for line in server.lines
            if (m := re.search(r"metrics_port[=\":\s]+(\d+)", line))
        )
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        max_tokens = 3 * steps + 16
        streams = client.submit(_drive_streams, server.address, batch, context, max_tokens, vocab)
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            def stats() -> inference_pb2.GetStatsResponse:
                return stub.GetStats(inference_pb2.GetStatsRequest())

            # Wait until all are decoding (running, nothing waiting), then skip a few steps.
            while not (stats().num_running == batch and stats().num_waiting == 0):
                time.sleep(0.05)
            first = stats().num_steps
            while stats().num_steps < first + steps // 2:
                time.sleep(0.02)
            start_steps, start_s = stats().num_steps, time.perf_counter()
            start_phases = _scrape_phases(metrics_url)
            while stats().num_steps < start_steps + steps:
                time.sleep(0.01)
            end_steps, end_s = stats().num_steps, time.perf_counter()
            end_phases = _scrape_phases(metrics_url)
        received = streams.result()
    num_steps = end_steps - start_steps
    phase_s = {
        phase: (end_phases[phase][0] - start_phases[phase][0]) / num_steps for phase in PHASES
    }
    return {
        "step_s": (end_s - start_s) / num_steps,
        "num_steps": num_steps,
        "phase_s": phase_s,
        "tokens_received": received,
        "tokens_expected": batch * max_tokens,
    }


def _num_blocks(batch: int, context: int, steps: int) -> int:
    return batch * -(-(context + 3 * steps + 64) // 16) + 8


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.steps = min(args.steps, 6)
    checkpoint = str(model_dir(args.model))
    os.environ["TWOLANE_THREADS"] = str(args.threads)
    vocab = json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"]
    # The bare engine runs in a process of its own, so its torch state is a fresh one.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        bare = pool.submit(
            measure_bare, checkpoint, args.dtype, args.batch, args.context, args.steps, args.threads
        ).result()
    served = measure_served(checkpoint, args.dtype, args.batch, args.context, args.steps, vocab)
    model_s = bare["forward_s"] + bare["sample_s"]
    served_step_s = float(served["step_s"])  # type: ignore[arg-type]
    overhead_s = served_step_s - model_s
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": args.model,
        "dtype": args.dtype,
        "batch": args.batch,
        "context": args.context,
        "threads": args.threads,
        "bare": bare,
        "served": served,
        "overhead_s": overhead_s,
        "overhead_share": overhead_s / served_step_s,
    }


def table(report: dict[str, Any]) -> str:
    bare, served = report["bare"], report["served"]

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f}"

    model_s = bare["forward_s"] + bare["sample_s"]
    rows = [
        f"# serving overhead — {report['date']}, model {report['model']} ({report['dtype']}), "
        f"decode at batch {report['batch']}, context ~{report['context']}, "
        f"{report['threads']} engine thread(s)",
        "",
        "| | ms per step |",
        "|---|---:|",
        f"| bare forward + sample | {ms(model_s)} |",
        f"| bare whole engine step (schedule ... outputs, no sockets) | {ms(bare['step_s'])} |",
        f"| served step ({served['num_steps']} steps, GetStats' step counter) "
        f"| {ms(served['step_s'])} |",
        "",
        "In the served engine core, per step:",
        "",
        "| phase | ms | share of the served step |",
        "|---|---:|---:|",
    ]
    for phase, seconds in served["phase_s"].items():
        rows.append(f"| {phase} | {ms(seconds)} | {seconds / served['step_s']:.1%} |")
    rows += [
        "",
        f"**overhead outside the model: {ms(report['overhead_s'])} ms = "
        f"{report['overhead_share']:.1%} of the served step** (target <= 5%)",
        f"tokens received {served['tokens_received']} of {served['tokens_expected']}",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    out = args.out or RESULTS_DIR / f"overhead-{report['model']}-{report['dtype']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    served = report["served"]
    return 0 if served["tokens_received"] == served["tokens_expected"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
