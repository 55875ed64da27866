"""Where an engine step's time goes: decode at batch 64 on the wider random Llama.

    .venv/bin/python bench/profile_step.py [--dtype bfloat16] [--batch 64] [--torch-profile]
        [--attention-backend torch|native] [--model wide|smollm2|DIR]

Times each part of `EngineCore.step` by wrapping the engine's own methods (nothing
in the engine changes): scheduling, input preparation, the model forward, lm_head,
sampling, output processing (token append, stop checks, outputs) and block commits.
`--torch-profile` adds the torch profiler's operator table and the share of the step
spent in GEMMs. What serving adds on top (sockets, frontends) is `make bench-overhead`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from twolane.bench.checkpoints import model_dir
from twolane.models import runner as runner_module
from twolane.models import sampling
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.protocol import AddRequest
from twolane.scheduler.request import Priority, SamplingParams

# Attention (K/V store included) runs inside the model forward: shown, not added again.
ATTENTION_PART = "  of which attention (all layers)"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")


class PartTimer:
    """Accumulates wall time per named part of the current step."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - start

        return timed

    @contextlib.contextmanager
    def instrument(self, engine: EngineCore) -> Iterator[None]:
        runner, model = engine.runner, engine.runner.model
        patches: list[tuple[object, str, object]] = [
            (engine.scheduler, "schedule", engine.scheduler.schedule),
            (runner, "_prepare", runner._prepare),
            (model, "forward", model.forward),
            (model, "compute_logits", model.compute_logits),
            (engine, "_process_samples", engine._process_samples),
            (engine.block_manager, "commit_full_blocks", engine.block_manager.commit_full_blocks),
            # Patched where the runner looks it up: its module's global `sample`.
            (runner_module, "sample", sampling.sample),
            (runner.backend, "forward", runner.backend.forward),
        ]
        names = {
            "schedule": "schedule",
            "_prepare": "prepare inputs",
            "forward": "model forward",
            "compute_logits": "lm_head (logits)",
            "_process_samples": "process outputs (stops, outputs)",
            "commit_full_blocks": "commit full blocks (prefix cache)",
            "sample": "sample",
            "forward#attention": ATTENTION_PART,
        }
        for owner, attr, original in patches:
            name = names[f"{attr}#attention" if owner is runner.backend else attr]
            setattr(owner, attr, self.wrap(name, original))  # type: ignore[arg-type]
        try:
            yield
        finally:
            for owner, attr, original in patches:
                if owner is runner_module:
                    setattr(owner, attr, original)
                else:
                    delattr(owner, attr)  # back to the class attribute


def random_prompts(vocab_size: int, batch: int, context: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (context,), generator=gen).tolist() for _ in range(batch)]


def add_requests(engine: EngineCore, batch: int, context: int, max_tokens: int, tag: str) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(engine.vocab_size, batch, context, 0)):
        now_s = time.monotonic()
        engine.add_request(AddRequest(f"{tag}-{i}", prompt, params, Priority.INTERACTIVE, now_s))


def prefill(engine: EngineCore) -> None:
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()


def profile_bare(engine: EngineCore, batch: int, context: int, num_steps: int) -> dict[str, float]:
    """Mean seconds per decode step of each part, and of the whole step."""
    add_requests(engine, batch, context, num_steps + 4, "bare")
    prefill(engine)
    engine.step()  # one untimed decode
    timer = PartTimer()
    step_times = []
    with timer.instrument(engine):
        for _ in range(num_steps):
            start = time.perf_counter()
            engine.load()  # the engine core process publishes its load after every step
            engine.step()
            step_times.append(time.perf_counter() - start)
    while engine.has_unfinished:
        engine.step()
    parts = {name: total / num_steps for name, total in timer.totals.items()}
    parts["step (total)"] = statistics.fmean(step_times)
    return parts


def engine_config(
    dtype: str, batch: int, context: int, attention_backend: str = "auto", model: str = "wide"
) -> EngineConfig:
    blocks_per_seq = -(-(context + 256) // 16)
    return EngineConfig(
        model=model if model == "smollm2" else str(model_dir(model)),
        dtype=dtype,
        max_num_seqs=batch,
        num_blocks=batch * blocks_per_seq + 8,
        attention_backend=attention_backend,
    )


def torch_profile(engine: EngineCore, batch: int, context: int, num_steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    add_requests(engine, batch, context, num_steps + 4, "torchprof")
    prefill(engine)
    engine.step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(num_steps):
            engine.step()
    wall = time.perf_counter() - start
    while engine.has_unfinished:
        engine.step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    print(
        f"GEMM self time {gemm_us / 1e3 / num_steps:.1f} ms/step of "
        f"{wall * 1e3 / num_steps:.1f} ms/step under the profiler "
        f"({gemm_us / 1e6 / wall:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "native", "torch"))
    parser.add_argument("--model", default="wide", help="wide, smollm2 or a checkpoint dir")
    args = parser.parse_args()

    engine = EngineCore(
        engine_config(args.dtype, args.batch, args.context, args.attention_backend, args.model)
    )
    parts = profile_bare(engine, args.batch, args.context, args.steps)
    step = parts.pop("step (total)")
    print(
        f"\n{args.model} model, {args.dtype}, {engine.runner.backend.name} attention, decode at "
        f"batch {args.batch}, context ~{args.context}: "
        f"{step * 1e3:.1f} ms per step ({args.steps} steps, mean)\n"
    )
    print("| part | ms/step | share |")
    print("|---|---:|---:|")
    model_time = 0.0
    order = sorted(parts.items(), key=lambda kv: -kv[1])
    attention = parts.pop(ATTENTION_PART, None)
    for name, seconds in order:
        if name == ATTENTION_PART:
            continue
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / step:.1%} |")
        if name == "model forward" and attention is not None:
            print(f"| {ATTENTION_PART} | {attention * 1e3:.2f} | {attention / step:.1%} |")
        if name in ("model forward", "lm_head (logits)"):
            model_time += seconds
    other = step - sum(v for k, v in parts.items() if k != ATTENTION_PART)
    print(f"| stats + rest of step() | {other * 1e3:.2f} | {other / step:.1%} |")
    overhead = step - model_time
    print(
        f"\nscheduler + Python overhead outside the model (everything but forward and lm_head): "
        f"{overhead * 1e3:.1f} ms = {overhead / step:.1%} of the step"
    )
    if args.torch_profile:
        torch_profile(engine, args.batch, args.context, max(4, args.steps // 2))


if __name__ == "__main__":
    main()
