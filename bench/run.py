"""`twolane bench`: twolane against transformers baselines, in one run, on one machine.

For each model and dtype: start `twolane serve` (or use --target), drive the
workload through GenerateStream, then through the OpenAI-compatible HTTP front
(streamed `/v1/completions`, prompts of the same lengths with other tokens, so
neither run finds the other's prompts in the prefix cache), submit the same
requests as batch-lane jobs and
wait for their completion events, stop the server, then run the same workload on
the transformers baselines in this process and measure this machine's ceilings
for the roofline. Writes `report.json` and `report.png` and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twolane.bench import report
from twolane.bench.workload import LengthRange, RequestSpec, load_jsonl, random_workload

if TYPE_CHECKING:
    from twolane.bench.checkpoints import ModelShape

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Plan:
    """The workload and baseline sizes of one model."""

    num_requests: int
    prompt_lens: LengthRange
    output_lens: LengthRange
    num_batch_jobs: int
    max_sequential_measured: int
    roofline_batches: tuple[int, ...]
    roofline_context: int


PLANS = {
    "builtin": Plan(128, LengthRange(8, 256), LengthRange(8, 128), 128, 32, (1, 16, 64), 128),
    "wide": Plan(64, LengthRange(8, 512), LengthRange(8, 256), 32, 8, (1, 16, 64), 128),
}
# Real weights with 30 thin layers, where per-layer overhead shows: twolane alone, at one
# request in flight and at 64, on the wide model's lengths.
SMOLLM2 = "smollm2"
SMOLLM2_ROWS = {1: 8, 64: 64}  # concurrency -> requests
SMOLLM2_LENS = (LengthRange(8, 512), LengthRange(8, 256))

QUICK_PLANS = {
    "builtin": Plan(12, LengthRange(4, 32), LengthRange(4, 16), 8, 12, (1, 4), 32),
    "wide": Plan(8, LengthRange(8, 64), LengthRange(4, 16), 8, 4, (1, 4), 64),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="a small run (tiny model, fp32) in under 2 minutes")
    add("--models", default=None, help="comma-separated: builtin, wide, or a checkpoint dir")
    add("--dtypes", default=None, help="comma-separated: float32, bfloat16")
    add("--num-requests", type=int, default=None, help="requests per run (default per model)")
    add("--concurrency", type=int, default=None, help="requests in flight (default 64)")
    add(
        "--rate",
        type=float,
        default=None,
        help="Poisson arrivals per second (default: closed loop)",
    )
    add("--prompt-lens", type=LengthRange.parse, default=None, help="uniform range, e.g. 8-512")
    add("--output-lens", type=LengthRange.parse, default=None, help="uniform range, e.g. 8-256")
    add(
        "--dataset",
        type=Path,
        default=None,
        help="JSONL of {prompt_token_ids|prompt_len, max_tokens}",
    )
    add("--seed", type=int, default=0, help="seed of the workload and the Poisson arrivals")
    add("--target", default=None, help="HOST:PORT of a running server (one model, --models DIR)")
    add("--nats-url", default=None, help="the running server's NATS, for the batch lane")
    add("--http-url", default=None, help="the running server's HTTP front, e.g. http://H:P")
    add("--no-http", action="store_true", help="skip the HTTP front's run")
    add("--no-baselines", action="store_true", help="skip the transformers baselines")
    add("--no-batch-lane", action="store_true", help="skip the batch-lane throughput run")
    add("--no-roofline", action="store_true", help="skip the ceilings and the decode roofline")
    add("--out", type=Path, default=None, help="output dir (default bench/results/<timestamp>)")


def main(args: argparse.Namespace) -> int:
    models = (args.models or ("builtin" if args.quick else f"builtin,wide,{SMOLLM2}")).split(",")
    dtypes = (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
    if args.target and len(models) != 1:
        print("twolane bench: --target needs exactly one --models entry (the server's checkpoint)")
        return 2
    import torch

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or RESULTS_DIR / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, object] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": args.command_line,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "num_threads": torch.get_num_threads(),
        },
        "runs": [],
    }
    runs: list[dict[str, object]] = result["runs"]  # type: ignore[assignment]
    for name in models:
        for dtype in dtypes:
            print(f"== {name} {dtype}", flush=True)
            try:
                runs.append(
                    run_rows(args, dtype) if name == SMOLLM2 else run_one(args, name, dtype)
                )
            except Exception:
                traceback.print_exc()
                runs.append({"model": name, "dtype": dtype, "error": traceback.format_exc()})
            (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=_jsonable))
    result["wall_s"] = time.perf_counter() - started
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=_jsonable))
    report.plot(result, out_dir / "report.png")
    print(report.tables(result))
    print(f"wrote {out_dir / 'report.json'} and {out_dir / 'report.png'}")
    return 1 if any("error" in r for r in runs) else 0


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def make_workload(args: argparse.Namespace, plan: Plan, vocab_size: int) -> list[RequestSpec]:
    num = args.num_requests or plan.num_requests
    if args.dataset is not None:
        return load_jsonl(args.dataset, vocab_size, num)
    return random_workload(
        num,
        args.prompt_lens or plan.prompt_lens,
        args.output_lens or plan.output_lens,
        vocab_size,
        args.seed,
    )


def other_tokens(spec: RequestSpec, vocab_size: int) -> RequestSpec:
    """The same lengths with every token id moved by one: a workload of equal cost that
    shares no prefix with `spec`."""
    prompt = tuple((t + 1) % vocab_size for t in spec.prompt_token_ids)
    return RequestSpec(prompt, spec.num_output_tokens)


def run_one(args: argparse.Namespace, name: str, dtype: str) -> dict[str, object]:
    from twolane.bench import baselines, batch_lane, interactive
    from twolane.bench.checkpoints import model_dir, model_shape
    from twolane.bench.server import Server, ServerSettings, start_server

    plans = QUICK_PLANS if args.quick else PLANS
    plan = plans.get(name, plans["wide"])
    checkpoint = model_dir(name)
    shape = model_shape(name)
    specs = make_workload(args, plan, shape.vocab_size)
    concurrency = args.concurrency or (4 if args.quick else 64)
    longest = max(s.num_prompt_tokens + s.num_output_tokens for s in specs)
    # Room for every request in flight at its longest, so no run is slowed by preemption.
    num_blocks = concurrency * -(-longest // BLOCK_SIZE) + 64
    run: dict[str, object] = {
        "model": name,
        "dtype": dtype,
        "model_dir": str(checkpoint),
        "shape": shape,
        "workload": {
            "num_requests": len(specs),
            "concurrency": concurrency,
            "rate_per_s": args.rate,
            "prompt_lens": str(args.prompt_lens or plan.prompt_lens),
            "output_lens": str(args.output_lens or plan.output_lens),
            "dataset": str(args.dataset) if args.dataset else None,
            "seed": args.seed,
        },
    }
    phases: dict[str, float] = {}
    loads: dict[str, float] = {}
    run["phase_wall_s"] = phases
    # The 1-minute load average after each phase: a shared machine is noisy, and this says how.
    run["phase_load_avg"] = loads
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[phase] = now - clock
        loads[phase] = os.getloadavg()[0]
        clock = now

    settings = ServerSettings(checkpoint, dtype, concurrency, num_blocks, concurrency)
    server = Server(args.target) if args.target else start_server(settings)
    lap("server_start")
    with server:
        run["twolane"] = interactive.run_interactive(
            server.address, specs, concurrency, args.rate, args.seed, f"twolane {name} {dtype}"
        )
        lap("twolane")
        http_url = args.http_url or server.http_url
        if not args.no_http and http_url:
            run["twolane_http"] = interactive.run_interactive_http(
                http_url,
                [other_tokens(s, shape.vocab_size) for s in specs],
                concurrency,
                args.rate,
                args.seed,
                f"twolane http {name} {dtype}",
            )
            lap("twolane_http")
        nats_url = args.nats_url or server.nats_url
        if not args.no_batch_lane and nats_url:
            run["batch_lane"] = batch_lane.run_batch_lane(
                server.address, nats_url, specs[: plan.num_batch_jobs]
            )
            lap("batch_lane")
    if not args.no_baselines:
        hf = baselines.HFGenerator(checkpoint, dtype)
        run["hf_static"] = baselines.run_static(hf, specs, concurrency, args.rate, args.seed)
        lap("hf_static")
        run["hf_sequential"] = baselines.run_sequential(
            hf, specs, concurrency, args.rate, args.seed, plan.max_sequential_measured
        )
        del hf
        lap("hf_sequential")
    if not args.no_roofline:
        run["roofline"] = measure_roofline(checkpoint, dtype, shape, plan, specs, run)
        lap("roofline")
    run["ratios"] = report.ratios(run)
    print(report.run_table(run), flush=True)
    return run


def run_rows(args: argparse.Namespace, dtype: str) -> dict[str, object]:
    """SmolLM2 through GenerateStream at each concurrency of SMOLLM2_ROWS (twolane only)."""
    from twolane.bench import interactive
    from twolane.bench.server import ServerSettings, start_server
    from twolane.models.resolve import resolve_model_dir

    checkpoint = resolve_model_dir(SMOLLM2)
    vocab_size = int(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
    prompt_lens, output_lens = SMOLLM2_LENS
    rows: dict[int, dict[str, object]] = {}
    most = max(SMOLLM2_ROWS)
    longest = prompt_lens.high + output_lens.high
    settings = ServerSettings(checkpoint, dtype, most, most * -(-longest // BLOCK_SIZE) + 64, most)
    with start_server(settings) as server:
        for concurrency, num_requests in SMOLLM2_ROWS.items():
            specs = random_workload(num_requests, prompt_lens, output_lens, vocab_size, args.seed)
            rows[concurrency] = interactive.run_interactive(
                server.address,
                specs,
                concurrency,
                None,
                args.seed,
                f"smollm2 {dtype} x{concurrency}",
            )
    run: dict[str, object] = {
        "model": SMOLLM2,
        "dtype": dtype,
        "model_dir": str(checkpoint),
        "workload": {"prompt_lens": str(prompt_lens), "output_lens": str(output_lens)},
        "rows": rows,
    }
    print(report.rows_table([run]), flush=True)
    return run


def measure_roofline(
    checkpoint: Path,
    dtype: str,
    shape: ModelShape,
    plan: Plan,
    specs: list[RequestSpec],
    run: dict[str, object],
) -> dict[str, object]:
    import torch

    from twolane.bench import roofline
    from twolane.models.loader import compute_dtype

    # The floor is the matmul rate of the dtype the engine computes in: on a CPU without
    # native bfloat16 matmuls, a bfloat16 run computes in float32 over a bfloat16 cache.
    compute = compute_dtype(dtype, "cpu")
    elem_bytes = torch.empty((), dtype=getattr(torch, compute)).element_size()
    kv_elem_bytes = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    bandwidth = roofline.measure_read_bandwidth()
    rate = roofline.measure_matmul_rate(shape, compute)
    steps = roofline.measure_decode_steps(
        str(checkpoint), dtype, plan.roofline_batches, plan.roofline_context
    )
    decode = []
    for batch, step_s in steps.items():
        floors = roofline.decode_floor_s(
            shape, batch, plan.roofline_context, elem_bytes, bandwidth, rate, kv_elem_bytes
        )
        decode.append(
            {"batch": batch, "step_s": step_s, **floors, "fraction": floors["floor_s"] / step_s}
        )
    flops = roofline.workload_flops(shape, specs)
    out: dict[str, object] = {
        "read_bytes_per_s": bandwidth,
        "matmul_flops_per_s": rate,
        "compute_dtype": compute,
        # What the requested dtype's own matmuls reach here, when the engine computes in another.
        "requested_dtype_matmul_flops_per_s": (
            rate if compute == dtype else roofline.measure_matmul_rate(shape, dtype)
        ),
        "context": plan.roofline_context,
        "decode": decode,
        "workload_flops": flops,
        "workload_compute_floor_s": flops / rate,
    }
    twolane = run.get("twolane")
    if isinstance(twolane, dict):
        out["twolane_fraction_of_compute_floor"] = flops / rate / twolane["duration_s"]
    return out
