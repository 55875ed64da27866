"""Where an engine step's time goes: decode at batch 64 on the wider random Llama.

    .venv/bin/python bench/profile_step.py [--dtype bfloat16] [--batch 64] [--torch-profile]

Times each part of `LLMEngine.step` by wrapping the engine's own methods (nothing
in the engine changes): scheduling, input preparation, the model forward, lm_head,
sampling, output processing (token append, detokenizing, stop checks, deltas) and
block commits; then the same decode driven through `AsyncEngine` with 64 asyncio
consumers, whose extra time per step is the cost of publishing stats and handing
outputs to the event loop (and of sharing the GIL with it). `--torch-profile` adds
the torch profiler's operator table and the share of the step spent in GEMMs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from twolane.bench.checkpoints import model_dir
from twolane.models import runner as runner_module
from twolane.scheduler.async_engine import AsyncEngine
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import LLMEngine
from twolane.scheduler.request import SamplingParams

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
    def instrument(self, engine: LLMEngine) -> Iterator[None]:
        runner, model = engine.runner, engine.runner.model
        patches: list[tuple[object, str, object]] = [
            (engine.scheduler, "schedule", engine.scheduler.schedule),
            (runner, "_prepare", runner._prepare),
            (model, "forward", model.forward),
            (model, "compute_logits", model.compute_logits),
            (engine, "_process_samples", engine._process_samples),
            (engine.block_manager, "commit_full_blocks", engine.block_manager.commit_full_blocks),
            (runner_module, "sample", runner_module.sample),
        ]
        names = {
            "schedule": "schedule",
            "_prepare": "prepare inputs",
            "forward": "model forward",
            "compute_logits": "lm_head (logits)",
            "_process_samples": "process outputs (detokenize, stops, deltas)",
            "commit_full_blocks": "commit full blocks (prefix cache)",
            "sample": "sample",
        }
        for owner, attr, original in patches:
            setattr(owner, attr, self.wrap(names[attr], original))  # type: ignore[arg-type]
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


def add_requests(engine: LLMEngine, batch: int, context: int, max_tokens: int, tag: str) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(engine.vocab_size, batch, context, 0)):
        engine.add_request(f"{tag}-{i}", prompt_token_ids=prompt, params=params)


def prefill(engine: LLMEngine) -> None:
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()


def profile_bare(engine: LLMEngine, batch: int, context: int, num_steps: int) -> dict[str, float]:
    """Mean seconds per decode step of each part, and of the whole step."""
    add_requests(engine, batch, context, num_steps + 4, "bare")
    prefill(engine)
    engine.step()  # one untimed decode
    timer = PartTimer()
    step_times = []
    with timer.instrument(engine):
        for _ in range(num_steps):
            start = time.perf_counter()
            engine.stats()  # AsyncEngine publishes stats after every step
            engine.step()
            step_times.append(time.perf_counter() - start)
    while engine.has_unfinished:
        engine.step()
    parts = {name: total / num_steps for name, total in timer.totals.items()}
    parts["step (total)"] = statistics.fmean(step_times)
    return parts


async def _async_decode(engine: AsyncEngine, batch: int, context: int, num_steps: int) -> float:
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=num_steps + 8, ignore_eos=True)
    streams = [
        engine.add_request(
            f"async-{i}",
            prompt_token_ids=torch.randint(
                0, engine.vocab_size, (context,), generator=gen
            ).tolist(),
            params=params,
        )
        for i in range(batch)
    ]
    counts = [0] * batch
    step_marks: list[tuple[int, float]] = []

    async def consume(i: int) -> None:
        async for out in streams[i]:
            counts[i] += len(out.new_token_ids)
            if i == 0:
                step_marks.append((counts[0], time.perf_counter()))

    await asyncio.gather(*(consume(i) for i in range(batch)))
    # Decode steps only: from the 4th token of request 0 to its last.
    (n0, t0), (n1, t1) = step_marks[3], step_marks[-1]
    return (t1 - t0) / (n1 - n0)


def profile_async(dtype: str, batch: int, context: int, num_steps: int) -> float:
    async def main() -> float:
        engine = AsyncEngine(engine_config(dtype, batch, context))
        await engine.start()
        try:
            return await _async_decode(engine, batch, context, num_steps)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def engine_config(dtype: str, batch: int, context: int) -> EngineConfig:
    blocks_per_seq = -(-(context + 256) // 16)
    return EngineConfig(
        model=str(model_dir("wide")),
        dtype=dtype,
        max_num_seqs=batch,
        num_blocks=batch * blocks_per_seq + 8,
    )


def torch_profile(engine: LLMEngine, batch: int, context: int, num_steps: int) -> None:
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
    parser.add_argument("--no-async", action="store_true", help="skip the AsyncEngine run")
    args = parser.parse_args()

    engine = LLMEngine(engine_config(args.dtype, args.batch, args.context))
    parts = profile_bare(engine, args.batch, args.context, args.steps)
    step = parts.pop("step (total)")
    print(
        f"\nwide model, {args.dtype}, decode at batch {args.batch}, context ~{args.context}: "
        f"{step * 1e3:.1f} ms per step ({args.steps} steps, mean)\n"
    )
    print("| part | ms/step | share |")
    print("|---|---:|---:|")
    model_time = 0.0
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / step:.1%} |")
        if name in ("model forward", "lm_head (logits)"):
            model_time += seconds
    other = step - sum(parts.values())
    print(f"| stats + rest of step() | {other * 1e3:.2f} | {other / step:.1%} |")
    overhead = step - model_time
    print(
        f"\nscheduler + Python overhead outside the model (everything but forward and lm_head): "
        f"{overhead * 1e3:.1f} ms = {overhead / step:.1%} of the step"
    )
    if args.torch_profile:
        torch_profile(engine, args.batch, args.context, max(4, args.steps // 2))
    if not args.no_async:
        del engine
        # A fresh process: this one has run OpenMP regions on its main thread, which would
        # slow every parallel op of the engine thread (as in serving, where the engine
        # thread is the only one that runs torch work).
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            job = pool.submit(profile_async, args.dtype, args.batch, args.context, args.steps)
            per_step = job.result()
        print(
            f"\nthrough AsyncEngine with {args.batch} asyncio consumers: {per_step * 1e3:.1f} ms "
            f"per decode step ({(per_step - step) * 1e3:+.1f} ms, "
            f"{(per_step - step) / per_step:+.1%} vs the bare step: stats, hand-off to the "
            f"event loop, GIL shared with it)"
        )


if __name__ == "__main__":
    main()
