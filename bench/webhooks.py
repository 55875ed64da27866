"""Webhook delivery: how long after a job finishes its webhook arrives, alone and beside a
dead endpoint.

    python -m twolane.bench.webhooks [--num-jobs 300] [--num-dead 100]

Starts `twolane serve` on the built-in model (its own data dir, http and 127.0.0.1
allowed), a receiver on loopback (aiohttp, answers 200 at once, verifies every signature
with `standardwebhooks`) and an endpoint that accepts connections and never answers.
Phase `alone`: N jobs with the receiver's URL. Phase `beside a dead endpoint`: first
`--num-dead` jobs whose URL is the dead endpoint, then N more for the receiver. For each
delivery the lag is the receipt time minus the job's finish time (the payload's
`timestamp`); throughput is deliveries per second from the first receipt to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from aiohttp import web
from standardwebhooks import Webhook

from twolane.v1 import generate_pb2, inference_pb2_grpc, jobs_pb2

if TYPE_CHECKING:
    from twolane.v1.inference_pb2_grpc import InferenceServiceAsyncStub

TWOLANE = str(Path(sys.executable).with_name("twolane"))


class Receiver:
    def __init__(self, secret: str) -> None:
        self.hook = Webhook(secret)
        self.lags_s: dict[str, float] = {}
        self.receipts_s: list[float] = []
        self.num_duplicates = 0
        self.num_bad_signatures = 0

    async def handle(self, request: web.Request) -> web.Response:
        now = dt.datetime.now(dt.timezone.utc)
        body = await request.read()
        try:
            event = self.hook.verify(body, dict(request.headers))
        except Exception:
            self.num_bad_signatures += 1
            return web.Response(status=400)
        job_id = event["data"]["job_id"]
        if job_id in self.lags_s:
            self.num_duplicates += 1
        finished = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        self.lags_s[job_id] = (now - finished).total_seconds()
        self.receipts_s.append(time.monotonic())
        return web.Response()


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(65536):
        pass
    writer.close()


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """`twolane serve` on the built-in model, once every child is ready; its gRPC port."""
    proc = subprocess.Popen(
        [
            *(TWOLANE, "serve", "--port", "0", "--log-json", "--model", "builtin"),
            *("--webhook-allow-http", "--webhook-allow-hosts", "127.0.0.1"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TWOLANE_DATA_DIR": str(data_dir)},
    )
    assert proc.stdout is not None
    port = None
    for line in proc.stdout:
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("event") == "listening" and port is None:
            port = int(entry["port"])
        if entry.get("event") == "serving":
            break
    if port is None:
        raise SystemExit("twolane serve did not start")
    # Keep reading, so that a full pipe never blocks the server.
    threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
    return proc, port


async def submit_all(
    stub: InferenceServiceAsyncStub, url: str, count: int, prefix: str
) -> list[str]:
    limit = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        request = jobs_pb2.SubmitJobRequest(
            request=generate_pb2.GenerateRequest(
                prompt=f"{prefix} {i}", params=generate_pb2.SamplingParams(max_tokens=1)
            ),
            webhook_url=url,
        )
        async with limit:
            return (await stub.SubmitJob(request)).job_id

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def wait_for(receiver: Receiver, job_ids: list[str], timeout_s: float) -> None:
    give_up_at = time.monotonic() + timeout_s
    while not set(job_ids) <= receiver.lags_s.keys():
        if time.monotonic() > give_up_at:
            raise SystemExit(f"only {len(receiver.lags_s)} of {len(job_ids)} webhooks arrived")
        await asyncio.sleep(0.1)


def summary(receiver: Receiver, job_ids: list[str]) -> dict[str, float]:
    lags_ms = sorted(receiver.lags_s[j] * 1000 for j in job_ids)
    span_s = max(receiver.receipts_s) - min(receiver.receipts_s)
    quantiles = statistics.quantiles(lags_ms, n=100)
    return {
        "num_jobs": len(job_ids),
        "lag_p50_ms": round(quantiles[49], 1),
        "lag_p95_ms": round(quantiles[94], 1),
        "lag_p99_ms": round(quantiles[98], 1),
        "lag_max_ms": round(lags_ms[-1], 1),
        "deliveries_per_s": round(len(job_ids) / span_s, 1) if span_s > 0 else 0.0,
    }


async def run(num_jobs: int, num_dead: int) -> dict[str, object]:
    data_dir = Path(tempfile.mkdtemp(prefix="twolane-bench-webhooks-"))
    proc, port = start_server(data_dir)
    try:
        secret = subprocess.run(
            [TWOLANE, "webhooks", "secret", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        receiver = Receiver(secret)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        dead = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        dead_url = f"http://127.0.0.1:{dead.sockets[0].getsockname()[1]}/hook"
        results: dict[str, object] = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            alone = await submit_all(stub, url, num_jobs, "alone")
            await wait_for(receiver, alone, 300)
            results["alone"] = summary(receiver, alone)
            receiver.receipts_s.clear()
            await submit_all(stub, dead_url, num_dead, "dead")
            beside = await submit_all(stub, url, num_jobs, "beside")
            await wait_for(receiver, beside, 300)
            results["beside a dead endpoint"] = summary(receiver, beside)
        results["duplicates"] = receiver.num_duplicates
        results["bad_signatures"] = receiver.num_bad_signatures
        dead.close()
        await runner.cleanup()
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-jobs", type=int, default=300)
    parser.add_argument("--num-dead", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.num_jobs, args.num_dead)), indent=2))


if __name__ == "__main__":
    main()
