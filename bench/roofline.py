"""Ceilings of this machine, measured in the same run, and the floors they put under a step.

A decode step at batch B must read every weight once (bytes / read bandwidth) and
multiply every token through every weight (FLOPs / matmul rate); the larger of the
two is the floor. The fraction achieved is floor / measured step time. A workload's
compute floor is its FLOPs over the matmul rate.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from twolane.bench.checkpoints import ModelShape
from twolane.bench.workload import RequestSpec

READ_BUFFER_BYTES = 512 * 1024 * 1024
NUM_REPEATS = 5


def _best_time(fn: Callable[[], object], repeats: int = NUM_REPEATS) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_read_bandwidth() -> float:
    """Bytes per second that a reduction over a buffer far larger than cache reads."""
    buffer = torch.ones(READ_BUFFER_BYTES // 4, dtype=torch.float32)
    seconds = _best_time(lambda: buffer.sum())
    return READ_BUFFER_BYTES / seconds


def measure_matmul_rate(shape: ModelShape, dtype: str) -> float:
    """FLOP/s of the best of the model's own GEMMs at 512 rows, the rate a full step could reach."""
    torch_dtype = getattr(torch, dtype)
    rows = 512
    h, inter = shape.hidden_size, shape.intermediate_size
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    best = 0.0
    for k, n in ((h, 2 * inter), (inter, h), (h, qkv)):
        a = torch.randn(rows, k).to(torch_dtype)
        w = torch.randn(n, k).to(torch_dtype)
        seconds = _best_time(functools.partial(torch.nn.functional.linear, a, w))
        best = max(best, 2 * rows * k * n / seconds)
    return best


def decode_flops(shape: ModelShape, batch: int, context: int) -> float:
    return batch * (2 * shape.num_matmul_params + shape.attention_flops(context))


def decode_bytes(
    shape: ModelShape, batch: int, context: int, elem_bytes: int, kv_elem_bytes: int | None = None
) -> float:
    """Weights (in the compute dtype) and K/V (in the cache's) a decode step reads."""
    kv_elem = elem_bytes if kv_elem_bytes is None else kv_elem_bytes
    return shape.num_weight_params * elem_bytes + batch * context * shape.kv_bytes_per_token(
        kv_elem
    )


def decode_floor_s(
    shape: ModelShape,
    batch: int,
    context: int,
    elem_bytes: int,
    read_bytes_per_s: float,
    matmul_flops_per_s: float,
    kv_elem_bytes: int | None = None,
) -> dict[str, float]:
    memory = decode_bytes(shape, batch, context, elem_bytes, kv_elem_bytes) / read_bytes_per_s
    compute = decode_flops(shape, batch, context) / matmul_flops_per_s
    return {"memory_floor_s": memory, "compute_floor_s": compute, "floor_s": max(memory, compute)}


def workload_flops(shape: ModelShape, specs: list[RequestSpec]) -> float:
    """Matmul and attention FLOPs to prefill every prompt and decode every output token."""
    layers = shape.num_matmul_params - shape.vocab_size * shape.hidden_size
    total = 0.0
    for spec in specs:
        p, o = spec.num_prompt_tokens, spec.num_output_tokens
        num_forward = p + o - 1
        contexts = p * (p + 1) / 2 + sum(range(p + 1, p + o))
        total += 2 * layers * num_forward + 2 * shape.vocab_size * shape.hidden_size * o
        total += shape.attention_flops(1) * contexts
    return total


def measure_decode_steps(
    model_dir: str, dtype: str, batches: tuple[int, ...], context: int, num_steps: int = 6
) -> dict[int, float]:
    """Median seconds of an engine decode step at each batch size (in this process)."""
    from twolane.scheduler.config import EngineConfig
    from twolane.scheduler.engine import EngineCore
    from twolane.scheduler.protocol import AddRequest
    from twolane.scheduler.request import Priority, SamplingParams

    max_batch = max(batches)
    blocks_per_seq = -(-(context + num_steps + 2) // 16)
    engine = EngineCore(
        EngineConfig(
            model=model_dir,
            dtype=dtype,
            max_num_seqs=max_batch,
            num_blocks=max_batch * blocks_per_seq + 8,
            max_num_batched_tokens=max(2048, context),
            enable_prefix_caching=False,
        )
    )
    gen = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    params = SamplingParams(max_tokens=num_steps + 2, ignore_eos=True)
    times: dict[int, float] = {}
    for batch in batches:
        for i in range(batch):
            prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
            request_id = f"roofline-{batch}-{i}"
            now_s = time.monotonic()
            engine.add_request(AddRequest(request_id, prompt, params, Priority.INTERACTIVE, now_s))
        # Prefill (whatever number of steps the token budget needs), then time decodes.
        while any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
        ) or (engine.scheduler.waiting):
            engine.step()
        step_times = []
        for _ in range(num_steps):
            start = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - start)
        times[batch] = statistics.median(step_times)
        while engine.has_unfinished:
            engine.step()
    return times
