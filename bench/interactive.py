"""Drive the interactive lane: N requests through GenerateStream at a fixed concurrency
or a Poisson arrival rate, timing every token as the client sees it."""

from __future__ import annotations

import asyncio
import time

import grpc
from tqdm import tqdm

from twolane.bench.metrics import RequestRecord, summarize
from twolane.bench.workload import RequestSpec, poisson_arrivals
from twolane.v1 import generate_pb2, inference_pb2_grpc

# Enough for the longest request of a loaded 2-core machine; a stuck server fails the run.
REQUEST_TIMEOUT_S = 1800.0
NUM_WARMUP_REQUESTS = 2


def stream_request(spec: RequestSpec) -> generate_pb2.GenerateStreamRequest:
    return generate_pb2.GenerateStreamRequest(
        prompt_token_ids=spec.prompt_token_ids,
        params=generate_pb2.SamplingParams(max_tokens=spec.num_output_tokens, ignore_eos=True),
    )


async def _send(
    stub: inference_pb2_grpc.InferenceServiceStub, spec: RequestSpec, record: RequestRecord
) -> None:
    try:
        call = stub.GenerateStream(stream_request(spec), timeout=REQUEST_TIMEOUT_S)
        async for chunk in call:
            if chunk.token_ids:
                record.add_tokens(len(chunk.token_ids), time.perf_counter())
    except grpc.aio.AioRpcError as err:
        record.error = f"{err.code().name}: {err.details()}"
    if record.error is None and record.num_output_tokens != spec.num_output_tokens:
        record.error = f"got {record.num_output_tokens} of {spec.num_output_tokens} tokens"


async def _run(
    address: str,
    specs: list[RequestSpec],
    concurrency: int,
    rate_per_s: float | None,
    seed: int,
    label: str,
) -> dict[str, object]:
    options = [("grpc.max_concurrent_streams", 0)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await channel.channel_ready()
        # Warm-up: the first steps of a fresh process build kernels and caches.
        warmup = [RequestSpec(specs[0].prompt_token_ids[:8], 4)] * NUM_WARMUP_REQUESTS
        await asyncio.gather(*(_send(stub, s, RequestRecord(8, 0.0)) for s in warmup))

        records: list[RequestRecord] = []
        progress = tqdm(total=len(specs), desc=label, unit="req", leave=False)
        start = time.perf_counter()

        async def one(spec: RequestSpec, arrived_s: float | None = None) -> None:
            # An open-loop request waiting for a free slot is late from its arrival on.
            record = RequestRecord(spec.num_prompt_tokens, arrived_s or time.perf_counter())
            records.append(record)
            await _send(stub, spec, record)
            progress.update()

        if rate_per_s is None:
            queue = list(reversed(specs))

            async def client() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(client() for _ in range(min(concurrency, len(specs)))))
        else:
            arrivals = poisson_arrivals(len(specs), rate_per_s, seed)
            limit = asyncio.Semaphore(concurrency)

            async def arrive(spec: RequestSpec, at_s: float) -> None:
                await asyncio.sleep(max(0.0, start + at_s - time.perf_counter()))
                arrived = time.perf_counter()
                async with limit:
                    await one(spec, arrived)

            await asyncio.gather(*(arrive(s, a) for s, a in zip(specs, arrivals, strict=True)))
        duration = time.perf_counter() - start
        progress.close()
    summary = summarize(records, duration)
    summary["errors"] = sorted({r.error for r in records if r.error})[:5]
    return summary


def run_interactive(
    address: str,
    specs: list[RequestSpec],
    concurrency: int,
    rate_per_s: float | None = None,
    seed: int = 0,
    label: str = "twolane",
) -> dict[str, object]:
    """Send `specs` through GenerateStream and summarise what the client measured.

    With `rate_per_s`, requests arrive as a Poisson process and at most
    `concurrency` are in flight; otherwise `concurrency` clients send back to back.
    """
    return asyncio.run(_run(address, specs, concurrency, rate_per_s, seed, label))
