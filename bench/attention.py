"""Decode attention microbench: KV bytes read per second against this machine's bandwidth.

    make bench-attention        # .venv/bin/python -m twolane.bench.attention

For each dtype, batch (1/16/64) and context (128/512/2048), one layer's decode attention
over the paged cache, with the wide bench model's heads (12 query heads over 4 KV heads,
head_dim 64, blocks of 16 tokens). The cache is a pool far larger than the last-level
cache, and every call reads a different random set of its blocks (as the layers of a
step and a fragmented cache do), so K/V come from memory, not from cache. Effective
bandwidth = the K and V bytes the call must read (batch x context x KV heads x head_dim x
2 x element size) / its median time. The machine's read bandwidth is measured in the
same run (`roofline.measure_read_bandwidth`), and so is the torch path (gather, upcast,
padded bucket products) on the same inputs.

Then, in the same run, the whole engine on the wide bench model with each attention
backend (`--attention-backend torch` and `native`): a batch of requests with prompts of
one length, run to completion with greedy decoding; output tok/s over the whole run
(prefill included) and over its decode steps alone. `--no-e2e` skips this part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from twolane.bench.checkpoints import model_dir
from twolane.bench.roofline import measure_read_bandwidth
from twolane.kernels import native
from twolane.kernels.torch_attention import paged_attention_torch, plan_step

NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 4, 3, 64, 16
BATCHES = (1, 16, 64)
CONTEXTS = (128, 512, 2048)
POOL_BYTES = 1 << 30  # K and V together, for fp32; bf16 pools hold twice the blocks
TARGET_FRACTION = 0.6
MIN_CALLS, MIN_SECONDS, NUM_REPEATS = 8, 0.25, 5


@dataclass(frozen=True)
class Row:
    dtype: str
    batch: int
    context: int
    kv_bytes: int
    native_s: float
    torch_s: float

    def gb_per_s(self, seconds: float) -> float:
        return self.kv_bytes / seconds / 1e9


def _time_calls(calls: list[Callable[[], object]]) -> float:
    """Median seconds per call over NUM_REPEATS rounds; each round cycles through `calls`."""
    calls[0]()
    per_call = []
    for _ in range(NUM_REPEATS):
        count, start = 0, time.perf_counter()
        while count < MIN_CALLS or time.perf_counter() - start < MIN_SECONDS:
            calls[count % len(calls)]()
            count += 1
        per_call.append((time.perf_counter() - start) / count)
    return statistics.median(per_call)


def measure(
    ops: native.NativeOps,
    dtype: torch.dtype,
    batch: int,
    context: int,
    pool: tuple[torch.Tensor, torch.Tensor],
) -> Row:
    k_pool, v_pool = pool
    num_pool_blocks = k_pool.shape[0]
    blocks_per_seq = -(-context // BLOCK_SIZE)
    gen = torch.Generator().manual_seed(batch * 10_000 + context)
    query = torch.randn(batch, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen).to(dtype)
    out = torch.empty_like(query)
    lens = torch.full((batch,), context, dtype=torch.int32)
    rows = torch.arange(batch, dtype=torch.int32)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    # Enough distinct tables that consecutive calls never reread what the last ones read.
    per_call = batch * blocks_per_seq
    num_tables = max(2, min(64, num_pool_blocks // per_call))
    tables = [
        torch.randperm(num_pool_blocks, generator=gen)[:per_call].view(batch, -1).int()
        for _ in range(num_tables)
    ]
    scale = HEAD_DIM**-0.5

    def native_call(t: torch.Tensor) -> Callable[[], None]:
        return lambda: ops.paged_decode(out, query, k_pool, v_pool, t, lens, rows, scale)

    def torch_call(t: torch.Tensor) -> Callable[[], torch.Tensor]:
        plan = plan_step(starts, lens, t, BLOCK_SIZE)
        return lambda: paged_attention_torch(query, k_pool, v_pool, plan, scale)

    native_s = _time_calls([native_call(t) for t in tables])
    torch_s = _time_calls([torch_call(t) for t in tables[: max(2, num_tables // 4)]])
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * k_pool.element_size()
    return Row(str(dtype).removeprefix("torch."), batch, context, kv_bytes, native_s, torch_s)


@dataclass(frozen=True)
class EngineRow:
    dtype: str  # the KV cache's
    compute_dtype: str  # the weights' and matmuls' (--bf16-compute auto)
    backend: str
    batch: int
    output_tokens: int
    total_s: float
    decode_s: float
    decode_tokens: int


def measure_engine(
    dtype: str, backend: str, batch: int, prompt_len: int, output_len: int
) -> EngineRow:
    """Greedy decoding of `batch` requests to completion in one engine, timed step by step."""
    from twolane.scheduler.config import EngineConfig
    from twolane.scheduler.engine import EngineCore
    from twolane.scheduler.protocol import AddRequest
    from twolane.scheduler.request import Priority, SamplingParams

    blocks_per_seq = -(-(prompt_len + output_len) // BLOCK_SIZE)
    engine = EngineCore(
        EngineConfig(
            model=str(model_dir("wide")),
            dtype=dtype,
            attention_backend=backend,
            max_num_seqs=batch,
            num_blocks=batch * blocks_per_seq + 8,
            enable_prefix_caching=False,
        )
    )
    if engine.runner.backend.name != backend:
        raise RuntimeError(f"asked for {backend} attention, got {engine.runner.backend.name}")
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, engine.vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add_request(
            AddRequest(f"e2e-{i}", prompt, params, Priority.INTERACTIVE, time.monotonic())
        )
    output_tokens = decode_tokens = 0
    decode_s = 0.0
    start = time.perf_counter()
    while engine.has_unfinished:
        # A step is a decode step when every running sequence has its whole prompt cached.
        decoding = not engine.scheduler.waiting and all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running
        )
        step_start = time.perf_counter()
        new_tokens = sum(len(out.new_token_ids) for out in engine.step())
        if decoding:
            decode_s += time.perf_counter() - step_start
            decode_tokens += new_tokens
        output_tokens += new_tokens
    total_s = time.perf_counter() - start
    return EngineRow(
        dtype,
        engine.compute_dtype,
        backend,
        batch,
        output_tokens,
        total_s,
        decode_s,
        decode_tokens,
    )


def print_engine_rows(rows: list[EngineRow], prompt_len: int, output_len: int) -> None:
    print(
        f"\nWhole engine, wide model: {rows[0].batch} requests together, prompts of "
        f"{prompt_len} tokens, {output_len} output tokens each (greedy); "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| KV dtype | compute dtype | attention | output tok/s (whole run) | decode tok/s "
        "| wall s | vs torch |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    torch_rates = {r.dtype: r.output_tokens / r.total_s for r in rows if r.backend == "torch"}
    for r in rows:
        rate = r.output_tokens / r.total_s
        decode_rate = r.decode_tokens / r.decode_s if r.decode_s > 0 else float("nan")
        base = torch_rates.get(r.dtype)
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(
            f"| {r.dtype} | {r.compute_dtype} | {r.backend} | {rate:.0f} | {decode_rate:.0f} "
            f"| {r.total_s:.1f} | {ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-e2e", action="store_true", help="skip the whole-engine runs")
    parser.add_argument("--e2e-only", action="store_true", help="only the whole-engine runs")
    parser.add_argument("--e2e-batch", type=int, default=64, help="requests run together")
    parser.add_argument("--e2e-prompt", type=int, default=256, help="prompt tokens each")
    parser.add_argument("--e2e-output", type=int, default=64, help="output tokens each")
    args = parser.parse_args()
    if not args.e2e_only:
        microbench(args.dtypes.split(","))
    if args.no_e2e:
        return
    engine_rows = [
        measure_engine(name, backend, args.e2e_batch, args.e2e_prompt, args.e2e_output)
        for name in args.dtypes.split(",")
        for backend in ("torch", "native")
    ]
    print_engine_rows(engine_rows, args.e2e_prompt, args.e2e_output)


def microbench(dtype_names: list[str]) -> None:
    ops = native.load()
    bandwidth = measure_read_bandwidth()
    rows: list[Row] = []
    for name in dtype_names:
        dtype = getattr(torch, name)
        elem = torch.empty((), dtype=dtype).element_size()
        num_blocks = POOL_BYTES // (2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4)
        shape = (num_blocks * 4 // elem, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        pool = (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
        for batch in BATCHES:
            for context in CONTEXTS:
                rows.append(measure(ops, dtype, batch, context, pool))
        del pool
    print(
        f"\nDecode attention, one layer: {NUM_KV_HEADS * GROUP} query heads over "
        f"{NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE}; native op "
        f"({ops.isa}) vs the torch path; {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}. Read bandwidth measured now: {bandwidth / 1e9:.1f} GB/s; "
        f"target {TARGET_FRACTION:.0%} of it.\n"
    )
    print(
        "| dtype | batch | context | KV MB | native us | native GB/s | of bandwidth "
        "| torch us | torch GB/s | speedup |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share = r.kv_bytes / r.native_s / bandwidth
        print(
            f"| {r.dtype} | {r.batch} | {r.context} | {r.kv_bytes / 1e6:.1f} "
            f"| {r.native_s * 1e6:.0f} | {r.gb_per_s(r.native_s):.1f} | **{share:.0%}** "
            f"| {r.torch_s * 1e6:.0f} | {r.gb_per_s(r.torch_s):.1f} "
            f"| {r.torch_s / r.native_s:.1f}x |"
        )


if __name__ == "__main__":
    main()
