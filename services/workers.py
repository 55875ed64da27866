"""The workers a gateway forwards to: given with `--worker`, or found in the bucket.

One channel per worker address, opened when the worker appears and closed when it is
gone and its last call has ended, so that a draining worker finishes what it has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import structlog

from twolane.services.membership import SERVING, WorkerRecord, worker_key
from twolane.services.routing import Candidate, PrefixIndex
from twolane.v1 import inference_pb2_grpc

if TYPE_CHECKING:
    # Only in the generated .pyi: the stub of an aio channel, whose calls are awaited.
    from twolane.v1.inference_pb2_grpc import InferenceServiceAsyncStub

log = structlog.get_logger(__name__)

# A worker whose max_num_seqs is unknown (static, or still starting) counts its load
# against this many slots.
DEFAULT_MAX_NUM_SEQS = 64


@dataclass
class Worker:
    """One worker and this gateway's calls in flight there; `record` is None for a
    static --worker."""

    key: str
    address: str
    channel: grpc.aio.Channel
    stub: InferenceServiceAsyncStub
    record: WorkerRecord | None = None
    num_in_flight: int = 0
    gone: bool = False
    closed: bool = False

    @property
    def routable(self) -> bool:
        return not self.gone and (self.record is None or self.record.state == SERVING)

    @property
    def is_failing(self) -> bool:
        return self.channel.get_state(True) is grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def candidate(self, index: PrefixIndex | None) -> Candidate:
        record = self.record
        if record is None:
            return Candidate(self.key, self.num_in_flight, DEFAULT_MAX_NUM_SEQS)
        return Candidate(
            self.key,
            max(self.num_in_flight, record.num_active_interactive),
            record.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
            record.block_size,
            record.tokenizer,
            index,
        )


@dataclass
class WorkerPool:
    """The workers by key; static ones from the start, discovered ones via `update`."""

    workers: dict[str, Worker] = field(default_factory=dict)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def static(cls, addresses: tuple[str, ...]) -> WorkerPool:
        pool = cls()
        for i, address in enumerate(addresses):
            # The same address given twice is two workers, each with its turn.
            key = f"{worker_key(address)}#{i}"
            pool.workers[key] = _open(key, address)
        return pool

    def update(self, key: str, record: WorkerRecord | None) -> None:
        """A membership change: a worker joined, changed, or left (record None)."""
        worker = self.workers.get(key)
        if record is None:
            if worker is not None:
                del self.workers[key]
                worker.gone = True
                self._close_if_idle(worker)
            return
        if worker is None or worker.address != record.address:
            if worker is not None:
                worker.gone = True
                self._close_if_idle(worker)
            worker = self.workers[key] = _open(key, record.address)
        worker.record = record

    def routable(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.routable]

    def all(self) -> list[Worker]:
        return list(self.workers.values())

    @contextmanager
    def calling(self, worker: Worker) -> Iterator[Worker]:
        """Count a call to `worker` for as long as it runs."""
        worker.num_in_flight += 1
        try:
            yield worker
        finally:
            worker.num_in_flight -= 1
            self._close_if_idle(worker)

    def _close_if_idle(self, worker: Worker) -> None:
        if worker.gone and worker.num_in_flight == 0 and not worker.closed:
            worker.closed = True
            task = asyncio.ensure_future(worker.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for worker in self.workers.values():
            worker.closed = True
            await worker.channel.close()
        self.workers.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _open(key: str, address: str) -> Worker:
    channel = grpc.aio.insecure_channel(address)
    return Worker(key, address, channel, inference_pb2_grpc.InferenceServiceStub(channel))
