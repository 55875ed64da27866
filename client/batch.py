"""`batch()`: many inputs as jobs, a bounded number unfinished at once, results as they
finish, each matched to its input by index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twolane.client.errors import TwolaneError
from twolane.client.requests import Prompt, Sampling, Tier
from twolane.v1 import jobs_pb2

if TYPE_CHECKING:
    from twolane.client.aio import AsyncClient

BatchInput = Prompt | jobs_pb2.SubmitJobRequest


@dataclass(frozen=True)
class BatchItem:
    """One input's outcome: `result` when its job finished (in any final state),
    `error` when submitting or waiting failed."""

    index: int
    input: BatchInput
    job_id: str
    result: jobs_pb2.GetResultResponse | None
    error: TwolaneError | None

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.state == jobs_pb2.JOB_STATE_SUCCEEDED


@dataclass(frozen=True)
class BatchProgress:
    num_done: int
    num_failed: int  # done, but not SUCCEEDED
    num_total: int | None  # None when the inputs have no length


class ProgressCounter:
    def __init__(
        self, num_total: int | None, on_progress: Callable[[BatchProgress], None] | None
    ) -> None:
        self._progress = BatchProgress(0, 0, num_total)
        self._on_progress = on_progress

    def add(self, item: BatchItem) -> None:
        done = self._progress
        self._progress = BatchProgress(
            done.num_done + 1, done.num_failed + (not item.ok), done.num_total
        )
        if self._on_progress is not None:
            self._on_progress(self._progress)


async def run_batch(
    client: AsyncClient,
    inputs: Iterable[BatchInput],
    concurrency: int,
    tier: Tier,
    timeout_s: float | None,
    sampling: Sampling,
    on_progress: Callable[[BatchProgress], None] | None,
) -> AsyncIterator[BatchItem]:
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    progress = ProgressCounter(len(inputs) if isinstance(inputs, Sized) else None, on_progress)
    pending = enumerate(inputs)  # read as room frees up: a long iterable is never held
    running: set[asyncio.Task[BatchItem]] = set()
    try:
        while True:
            while len(running) < concurrency and (following := next(pending, None)):
                index, item = following
                job = run_one(client, index, item, tier, timeout_s, sampling)
                running.add(asyncio.ensure_future(job))
            if not running:
                return
            finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                outcome = task.result()
                progress.add(outcome)
                yield outcome
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def run_one(
    client: AsyncClient,
    index: int,
    item: BatchInput,
    tier: Tier,
    timeout_s: float | None,
    sampling: Sampling,
) -> BatchItem:
    job_id = ""
    try:
        if isinstance(item, jobs_pb2.SubmitJobRequest):
            submitted = await client.submit(item)
        else:
            submitted = await client.submit(item, tier=tier, custom_id=str(index), **sampling)
        job_id = submitted.job_id
        result = await client.wait(job_id, timeout_s)
    except TwolaneError as error:
        return BatchItem(index, item, job_id, None, error)
    return BatchItem(index, item, job_id, result, None)
