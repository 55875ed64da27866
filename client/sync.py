"""`Client`: the blocking twolane API, for code without an event loop.

It runs an `AsyncClient` on an event loop of its own, in a background thread, so the
two clients share every rule (deadlines, retries, waiting) by construction. A `Client`
may be used from several threads at once; Ctrl-C during a call cancels the call.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
    Sized,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from twolane.client.aio import AsyncClient
from twolane.client.batch import BatchInput, BatchItem, BatchProgress, ProgressCounter
from twolane.client.config import ClientConfig
from twolane.client.requests import Message, Prompt, Sampling, Tier
from twolane.client.retry import ClientStats
from twolane.client.stream import AsyncTextStream
from twolane.v1 import generate_pb2, inference_pb2, jobs_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")
# How long a cancelled call may take to unwind before the caller gets its exception.
UNWIND_WAIT_S = 5.0


class _Loop:
    """An event loop running in a daemon thread until closed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="twolane-client", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        started, unwound = threading.Event(), threading.Event()

        async def running() -> T:
            started.set()
            try:
                return await coroutine
            finally:
                unwound.set()

        future = asyncio.run_coroutine_threadsafe(running(), self.loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C, or the caller's thread being stopped: end the call, and let it
            # unwind on the loop (a stream's generator must have stopped before it can
            # be closed). A call cancelled before it started has nothing to unwind.
            if future.cancel() and started.is_set():
                unwound.wait(UNWIND_WAIT_S)
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _close(loop: _Loop, client: AsyncClient) -> None:
    if not loop.loop.is_closed():
        loop.run(client.close())
        loop.stop()


class Client:
    """A blocking client of one or more twolane servers; use it as `with Client(...)`.

    Args:
        config: a `ClientConfig`, a target (HOST:PORT), a list of targets, or None for
            `ClientConfig.from_env()`.
    """

    def __init__(self, config: ClientConfig | str | Sequence[str] | None = None) -> None:
        self._loop = _Loop()
        try:
            # Made on the loop's thread, where its channels will live.
            self._async = self._loop.run(_make(config))
        except BaseException:
            self._loop.stop()
            raise
        self._finalizer = weakref.finalize(self, _close, self._loop, self._async)

    @property
    def config(self) -> ClientConfig:
        return self._async.config

    @property
    def stats(self) -> ClientStats:
        return self._async.stats

    def close(self) -> None:
        """Close the channels and the NATS connection, and stop the loop thread."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- the interactive lane -----------------------------------------------------

    def generate(
        self,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> generate_pb2.GenerateResponse:
        """One completion, whole (see `AsyncClient.generate`)."""
        return self._loop.run(
            self._async.generate(
                prompt, messages=messages, request_id=request_id, timeout_s=timeout_s, **sampling
            )
        )

    def chat(
        self,
        messages: Sequence[Message],
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> generate_pb2.GenerateResponse:
        """The model's next turn in a conversation."""
        return self._loop.run(
            self._async.chat(messages, request_id=request_id, timeout_s=timeout_s, **sampling)
        )

    def stream(
        self,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> TextStream:
        """A completion as it is generated: iterate for text deltas, then read
        `.response`."""
        stream = self._async.stream(
            prompt, messages=messages, request_id=request_id, timeout_s=timeout_s, **sampling
        )
        return TextStream(stream, self._loop)

    def get_stats(
        self, *, request_id: str | None = None, timeout_s: float | None = None
    ) -> inference_pb2.GetStatsResponse:
        return self._loop.run(self._async.get_stats(request_id=request_id, timeout_s=timeout_s))

    # ---- the batch lane -----------------------------------------------------------

    def submit(
        self,
        prompt: Prompt | jobs_pb2.SubmitJobRequest | None = None,
        *,
        messages: Sequence[Message] | None = None,
        tier: Tier = "standard",
        idempotency_key: str | None = None,
        custom_id: str = "",
        job_deadline_s: float | None = None,
        webhook_url: str = "",
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> jobs_pb2.SubmitJobResponse:
        """Queue a durable job and return its id at once (see `AsyncClient.submit`)."""
        return self._loop.run(
            self._async.submit(
                prompt,
                messages=messages,
                tier=tier,
                idempotency_key=idempotency_key,
                custom_id=custom_id,
                job_deadline_s=job_deadline_s,
                webhook_url=webhook_url,
                request_id=request_id,
                timeout_s=timeout_s,
                **sampling,
            )
        )

    def result(
        self, job_id: str, *, request_id: str | None = None, timeout_s: float | None = None
    ) -> jobs_pb2.GetResultResponse:
        return self._loop.run(
            self._async.result(job_id, request_id=request_id, timeout_s=timeout_s)
        )

    def cancel(
        self, job_id: str, *, request_id: str | None = None, timeout_s: float | None = None
    ) -> jobs_pb2.CancelJobResponse:
        return self._loop.run(
            self._async.cancel(job_id, request_id=request_id, timeout_s=timeout_s)
        )

    def wait(self, job_id: str, timeout_s: float | None = None) -> jobs_pb2.GetResultResponse:
        """The job's final state and result, as soon as it has them (see
        `AsyncClient.wait`)."""
        return self._loop.run(self._async.wait(job_id, timeout_s))

    def watch(self, job_id: str, timeout_s: float | None = None) -> jobs_pb2.JobEvent | None:
        """The job's completion event from NATS alone (see `AsyncClient.watch`)."""
        return self._loop.run(self._async.watch(job_id, timeout_s))

    def submit_and_wait(
        self,
        prompt: Prompt | jobs_pb2.SubmitJobRequest | None = None,
        *,
        messages: Sequence[Message] | None = None,
        tier: Tier = "standard",
        idempotency_key: str | None = None,
        custom_id: str = "",
        job_deadline_s: float | None = None,
        webhook_url: str = "",
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> jobs_pb2.GetResultResponse:
        return self._loop.run(
            self._async.submit_and_wait(
                prompt,
                messages=messages,
                tier=tier,
                idempotency_key=idempotency_key,
                custom_id=custom_id,
                job_deadline_s=job_deadline_s,
                webhook_url=webhook_url,
                timeout_s=timeout_s,
                **sampling,
            )
        )

    def batch(
        self,
        inputs: Iterable[BatchInput],
        *,
        concurrency: int = 32,
        tier: Tier = "bulk",
        timeout_s: float | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Iterator[BatchItem]:
        """Run every input as a job and yield each `BatchItem` as it finishes (see
        `AsyncClient.batch`); `on_progress` runs in the caller's thread."""
        progress = ProgressCounter(len(inputs) if isinstance(inputs, Sized) else None, on_progress)
        items = self._async.batch(
            inputs, concurrency=concurrency, tier=tier, timeout_s=timeout_s, **sampling
        )
        for item in _iterate(items, self._loop):
            progress.add(item)
            yield item


class TextStream:
    """A blocking `AsyncTextStream`: iterate for text deltas; `response` once done.
    Leaving early (break, `close()`, the `with` block's end) cancels the call."""

    def __init__(self, stream: AsyncTextStream, loop: _Loop) -> None:
        self._stream = stream
        self._loop = loop

    @property
    def response(self) -> generate_pb2.GenerateResponse:
        return self._stream.response

    @property
    def finished(self) -> bool:
        return self._stream.finished

    def __iter__(self) -> Iterator[str]:
        return _iterate(self._stream, self._loop)

    def close(self) -> None:
        self._loop.run(self._stream.aclose())

    def __enter__(self) -> TextStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _iterate(items: AsyncIterator[T], loop: _Loop) -> Iterator[T]:
    """An async iterator, read from the loop's thread one item at a time; closed (on the
    loop) when the caller stops early."""

    async def following() -> list[T]:
        """The next item, or none at the end (StopAsyncIteration cannot cross threads)."""
        try:
            return [await items.__anext__()]
        except StopAsyncIteration:
            return []

    try:
        while next_items := loop.run(following()):
            yield next_items[0]
    finally:
        close = getattr(items, "aclose", None)
        if close is not None and not loop.loop.is_closed():
            loop.run(close())


async def _make(config: ClientConfig | str | Sequence[str] | None) -> AsyncClient:
    return AsyncClient(config)
