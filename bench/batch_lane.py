"""Batch-lane throughput: submit M durable jobs, wait for every completion event."""

from __future__ import annotations

import asyncio
import time

import grpc
import nats
from nats.aio.msg import Msg
from tqdm import tqdm

from twolane.bench.workload import RequestSpec
from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

RESULTS_SUBJECT = "twolane.results.>"
SUCCEEDED = jobs_pb2.JOB_STATE_SUCCEEDED


def job_request(spec: RequestSpec, index: int) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        request=generate_pb2.GenerateRequest(
            prompt_token_ids=spec.prompt_token_ids,
            params=generate_pb2.SamplingParams(max_tokens=spec.num_output_tokens, ignore_eos=True),
        ),
        tier=jobs_pb2.JOB_TIER_STANDARD,
        custom_id=f"bench-{index}",
    )


async def _run(
    address: str, nats_url: str, specs: list[RequestSpec], timeout_s: float
) -> dict[str, object]:
    events: dict[str, jobs_pb2.JobEvent] = {}
    all_seen = asyncio.Event()
    wanted: set[str] = set()
    progress = tqdm(total=len(specs), desc="batch lane", unit="job", leave=False)

    async def on_event(msg: Msg) -> None:
        event = jobs_pb2.JobEvent.FromString(msg.data)
        if event.custom_id.startswith("bench-") and event.job_id not in events:
            events[event.job_id] = event
            progress.update()
            if wanted and wanted <= events.keys():
                all_seen.set()

    nc = await nats.connect(nats_url)
    try:
        # Subscribe before submitting, so no completion event can be missed.
        await nc.subscribe(RESULTS_SUBJECT, cb=on_event)
        await nc.flush()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            start = time.perf_counter()
            responses = await asyncio.gather(
                *(stub.SubmitJob(job_request(s, i)) for i, s in enumerate(specs))
            )
            submitted = time.perf_counter() - start
            wanted.update(r.job_id for r in responses)
            if wanted <= events.keys():
                all_seen.set()
            await asyncio.wait_for(all_seen.wait(), timeout_s)
            duration = time.perf_counter() - start
    finally:
        progress.close()
        await nc.close()
    mine = [events[j] for j in wanted]
    ok = [e for e in mine if e.state == SUCCEEDED]
    num_output = sum(e.result.usage.completion_tokens for e in ok)
    return {
        "num_jobs": len(specs),
        "num_succeeded": len(ok),
        "num_failed": len(mine) - len(ok),
        "submit_s": submitted,
        "duration_s": duration,
        "jobs_per_s": len(ok) / duration,
        "output_tokens_per_s": num_output / duration,
        "num_output_tokens": num_output,
    }


def run_batch_lane(
    address: str, nats_url: str, specs: list[RequestSpec], timeout_s: float = 1800.0
) -> dict[str, object]:
    """Submit `specs` as jobs at once; time until the last completion event arrives."""
    return asyncio.run(_run(address, nats_url, specs, timeout_s))
