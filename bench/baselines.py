"""The transformers baselines, on the same weights, dtype and workload as twolane.

(1) `sequential`: a plain synchronous server that runs `generate()` on one request
at a time. (2) `static`: a static-batching server that left-pads up to
`concurrency` waiting requests into one `generate()` call and takes no new work
until the slowest of them is done.

Both run in this process on a virtual clock: requests arrive as the workload says
(closed loop at a fixed concurrency, or Poisson), wait while the server is busy,
and every batch runs for real, so each token's time is the batch's start on the
clock plus its measured offset. No wall time is spent idling, and the server's
queueing is exactly that of the workload.

A sequential request's service time does not depend on the others, so on large
workloads `sequential` may measure an evenly spaced subset and predict the rest
from a least-squares fit (TTFT linear in prompt length, time per output token
linear in context length); the report says how many were measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from twolane.bench.metrics import RequestRecord, summarize
from twolane.bench.workload import RequestSpec, poisson_arrivals

# Offsets (seconds from the batch's start) at which each request's tokens came out.
TokenOffsets = list[list[float]]
RunBatch = Callable[[list[int]], TokenOffsets]


class _StepClock(BaseStreamer):
    """Records when `generate()` hands over each new token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times_s: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt:
            self.times_s.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


class HFGenerator:
    """transformers `generate()`, greedy, EOS ignored, with per-step times."""

    def __init__(self, model_dir: Path, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)
        ).eval()
        # Exact output lengths, as twolane's ignore_eos gives.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    @torch.inference_mode()
    def generate(self, specs: list[RequestSpec]) -> TokenOffsets:
        """Run `specs` as one left-padded batch until the longest output is done."""
        width = max(s.num_prompt_tokens for s in specs)
        ids = torch.zeros((len(specs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, spec in enumerate(specs):
            ids[row, width - spec.num_prompt_tokens :] = torch.tensor(spec.prompt_token_ids)
            mask[row, width - spec.num_prompt_tokens :] = 1
        num_new = max(s.num_output_tokens for s in specs)
        clock = _StepClock()
        start = time.perf_counter()
        self.model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            streamer=clock,
        )
        steps = [t - start for t in clock.times_s]
        return [steps[: s.num_output_tokens] for s in specs]

    def warm_up(self, spec: RequestSpec) -> None:
        self.generate([RequestSpec(spec.prompt_token_ids[:8], 4)])


def simulate(
    specs: list[RequestSpec],
    batch_size: int,
    concurrency: int,
    rate_per_s: float | None,
    seed: int,
    run_batch: RunBatch,
    progress: tqdm[Any] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Serve `specs` one batch at a time on a virtual clock; returns records and duration."""
    num = len(specs)
    if rate_per_s is None:
        # Closed loop: `concurrency` clients; each sends its next request when one finishes.
        arrivals = [0.0] * min(concurrency, num) + [math.inf] * max(0, num - concurrency)
    else:
        arrivals = poisson_arrivals(num, rate_per_s, seed)
    num_sent = min(concurrency, num) if rate_per_s is None else num
    records: list[RequestRecord | None] = [None] * num
    unstarted = list(range(num))
    clock = 0.0
    while unstarted:
        ready = [i for i in unstarted if arrivals[i] <= clock][:batch_size]
        if not ready:
            clock = min(arrivals[i] for i in unstarted)
            continue
        offsets = run_batch(ready)
        finishes = []
        for i, offs in zip(ready, offsets, strict=True):
            record = RequestRecord(specs[i].num_prompt_tokens, arrivals[i])
            record.token_times_s = [clock + t for t in offs]
            records[i] = record
            finishes.append(record.token_times_s[-1])
            unstarted.remove(i)
        if rate_per_s is None:
            for finish in sorted(finishes):
                if num_sent < num:
                    arrivals[num_sent] = finish
                    num_sent += 1
        clock += max(offs[-1] for offs in offsets)
        if progress is not None:
            progress.update(len(ready))
    done = [r for r in records if r is not None]
    duration = max(r.token_times_s[-1] for r in done)
    return done, duration


def run_static(
    hf: HFGenerator,
    specs: list[RequestSpec],
    concurrency: int,
    rate_per_s: float | None,
    seed: int,
) -> dict[str, object]:
    """Baseline (2): static batches of up to `concurrency` requests."""
    hf.warm_up(specs[0])
    with tqdm(total=len(specs), desc="hf static batching", unit="req", leave=False) as bar:
        records, duration = simulate(
            specs,
            concurrency,
            concurrency,
            rate_per_s,
            seed,
            lambda rows: hf.generate([specs[i] for i in rows]),
            bar,
        )
    summary = summarize(records, duration)
    summary["batch_size"] = concurrency
    return summary


def run_sequential(
    hf: HFGenerator,
    specs: list[RequestSpec],
    concurrency: int,
    rate_per_s: float | None,
    seed: int,
    max_measured: int | None = None,
) -> dict[str, object]:
    """Baseline (1): one request at a time, all measured or a subset plus a fit."""
    hf.warm_up(specs[0])
    num_measured = len(specs) if max_measured is None else min(max_measured, len(specs))
    measured_rows = sorted(
        {round(k * (len(specs) - 1) / max(1, num_measured - 1)) for k in range(num_measured)}
    )
    offsets: dict[int, list[float]] = {}
    for row in tqdm(measured_rows, desc="hf sequential", unit="req", leave=False):
        offsets[row] = hf.generate([specs[row]])[0]
    if len(offsets) < len(specs):
        predict = _fit_service_times({r: (specs[r], offsets[r]) for r in offsets})
        for row, spec in enumerate(specs):
            if row not in offsets:
                offsets[row] = predict(spec)
    records, duration = simulate(
        specs, 1, concurrency, rate_per_s, seed, lambda rows: [offsets[rows[0]]]
    )
    summary = summarize(records, duration)
    summary["num_measured"] = len(measured_rows)
    return summary


def _fit_service_times(
    samples: dict[int, tuple[RequestSpec, list[float]]],
) -> Callable[[RequestSpec], list[float]]:
    """Least squares: TTFT = a + b * prompt; per-token time = c + d * context."""
    ttft_x, ttft_y, tpot_x, tpot_y = [], [], [], []
    for spec, offs in samples.values():
        ttft_x.append([1.0, spec.num_prompt_tokens])
        ttft_y.append([offs[0]])
        if len(offs) > 1:
            tpot_x.append([1.0, spec.num_prompt_tokens + len(offs) / 2])
            tpot_y.append([(offs[-1] - offs[0]) / (len(offs) - 1)])

    def fit(x: list[list[float]], y: list[list[float]]) -> list[float]:
        solution = torch.linalg.lstsq(
            torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        ).solution
        coefficients: list[float] = solution[:, 0].tolist()
        return coefficients

    a, b = fit(ttft_x, ttft_y)
    c, d = fit(tpot_x, tpot_y)

    def predict(spec: RequestSpec) -> list[float]:
        ttft = max(1e-4, a + b * spec.num_prompt_tokens)
        tpot = max(1e-4, c + d * (spec.num_prompt_tokens + spec.num_output_tokens / 2))
        return [ttft + k * tpot for k in range(spec.num_output_tokens)]

    return predict
