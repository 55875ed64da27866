"""Drive the interactive lane: N requests through GenerateStream (or the OpenAI-compatible
HTTP front's streamed completions) at a fixed concurrency or a Poisson arrival rate,
timing every token as the client sees it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import httpx
from tqdm import tqdm

from twolane.bench.metrics import RequestRecord, summarize
from twolane.bench.workload import RequestSpec, poisson_arrivals
from twolane.v1 import generate_pb2, inference_pb2_grpc

if TYPE_CHECKING:
    from twolane.v1.inference_pb2_grpc import InferenceServiceAsyncStub

# Enough for the longest request of a loaded 2-core machine; a stuck server fails the run.
REQUEST_TIMEOUT_S = 1800.0
NUM_WARMUP_REQUESTS = 2


def stream_request(spec: RequestSpec) -> generate_pb2.GenerateStreamRequest:
    return generate_pb2.GenerateStreamRequest(
        prompt_token_ids=spec.prompt_token_ids,
        params=generate_pb2.SamplingParams(max_tokens=spec.num_output_tokens, ignore_eos=True),
    )


async def _send(stub: InferenceServiceAsyncStub, spec: RequestSpec, record: RequestRecord) -> None:
    try:
        call = stub.GenerateStream(stream_request(spec), timeout=REQUEST_TIMEOUT_S)
        async for chunk in call:
            if chunk.token_ids:
                record.add_tokens(len(chunk.token_ids), time.perf_counter())
    except grpc.aio.AioRpcError as err:
        record.error = f"{err.code().name}: {err.details()}"
    if record.error is None and record.num_output_tokens != spec.num_output_tokens:
        record.error = f"got {record.num_output_tokens} of {spec.num_output_tokens} tokens"


Send = Callable[[RequestSpec, RequestRecord], Awaitable[None]]


async def _drive(
    send: Send,
    specs: list[RequestSpec],
    concurrency: int,
    rate_per_s: float | None,
    seed: int,
    label: str,
) -> dict[str, object]:
    """Warm up, then send `specs` closed-loop or as Poisson arrivals; summarise."""
    # Warm-up: the first steps of a fresh process build kernels and caches.
    warmup = [RequestSpec(specs[0].prompt_token_ids[:8], 4)] * NUM_WARMUP_REQUESTS
    await asyncio.gather(*(send(s, RequestRecord(8, 0.0)) for s in warmup))

    records: list[RequestRecord] = []
    progress = tqdm(total=len(specs), desc=label, unit="req", leave=False)
    start = time.perf_counter()

    async def one(spec: RequestSpec, arrived_s: float | None = None) -> None:
        # An open-loop request waiting for a free slot is late from its arrival on.
        record = RequestRecord(spec.num_prompt_tokens, arrived_s or time.perf_counter())
        records.append(record)
        await send(spec, record)
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
        return await _drive(
            lambda spec, record: _send(stub, spec, record),
            specs,
            concurrency,
            rate_per_s,
            seed,
            label,
        )


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


# ---- the same workload through the OpenAI-compatible HTTP front ------------------------


def http_body(spec: RequestSpec) -> dict[str, object]:
    """The HTTP twin of `stream_request`: greedy, exactly that many tokens, streamed."""
    return {
        "prompt": list(spec.prompt_token_ids),
        "max_tokens": spec.num_output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }


async def _send_http(client: httpx.AsyncClient, spec: RequestSpec, record: RequestRecord) -> None:
    try:
        async with client.stream("POST", "/v1/completions", json=http_body(spec)) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message"))
                    return
                num_tokens = sum(len(c.get("token_ids") or ()) for c in chunk["choices"])
                if num_tokens:
                    record.add_tokens(num_tokens, time.perf_counter())
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    if record.error is None and record.num_output_tokens != spec.num_output_tokens:
        record.error = f"got {record.num_output_tokens} of {spec.num_output_tokens} tokens"


async def _run_http(
    base_url: str,
    specs: list[RequestSpec],
    concurrency: int,
    rate_per_s: float | None,
    seed: int,
    label: str,
) -> dict[str, object]:
    limits = httpx.Limits(max_connections=concurrency + NUM_WARMUP_REQUESTS)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:
        return await _drive(
            lambda spec, record: _send_http(client, spec, record),
            specs,
            concurrency,
            rate_per_s,
            seed,
            label,
        )


def run_interactive_http(
    base_url: str,
    specs: list[RequestSpec],
    concurrency: int,
    rate_per_s: float | None = None,
    seed: int = 0,
    label: str = "twolane http",
) -> dict[str, object]:
    """`run_interactive`, through `POST /v1/completions` with `stream: true` (SSE)."""
    return asyncio.run(_run_http(base_url, specs, concurrency, rate_per_s, seed, label))
