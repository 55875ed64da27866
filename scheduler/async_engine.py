"""Drives `LLMEngine` from a dedicated thread and streams outputs to asyncio callers.

Forward passes run on the engine thread, so the event loop stays free for I/O.
Callers talk to the thread through an inbox of commands; outputs come back with
one `call_soon_threadsafe` per step. The thread also checks the inbox between the
layers of a step, so a new interactive request starts in an urgent step at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from twolane.models.tokenizer import Tokenizer
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineStats, LLMEngine
from twolane.scheduler.errors import EngineStoppedError, QueueFullError
from twolane.scheduler.request import FinishReason, Priority, RequestOutput, SamplingParams

log = structlog.get_logger(__name__)

__all__ = ["AsyncEngine", "EngineStats", "RequestStream"]


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: Priority
    deadline_s: float | None
    arrival_time_s: float
    stream: bool


@dataclass(frozen=True)
class _Abort:
    request_id: str


class RequestStream:
    """Async iterator over one request's outputs. Leaving it early aborts the request."""

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._queue.get()
                self.finished = out.finished
                yield out
        finally:
            # Reached on normal completion, an exception, cancellation or an early break.
            if not self.finished:
                self._engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)

    def _put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # Built by start(), on the engine thread; see _main.
        self.engine: LLMEngine
        self.tokenizer: Tokenizer
        self.vocab_size: int
        self.max_model_len: int
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        # Commands taken from the inbox during a step and applied after it, in order.
        self._deferred: collections.deque[_Abort | None] = collections.deque()
        self._streams: dict[str, RequestStream] = {}
        self._stats: EngineStats | None = None
        self._num_queued_interactive = 0  # admitted to the inbox, not yet seen by the engine
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wakeup = threading.Event()
        self._listeners: list[Callable[[EngineStats], None]] = []

    async def start(self) -> None:
        """Load the model on the engine thread and start stepping.

        Raises:
            Whatever loading the model raises (a missing checkpoint, a bad config).
        """
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name="twolane-engine", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            raise

    def _main(self, ready: asyncio.Future[None]) -> None:
        # All of the engine's torch work, loading included, happens on this one thread:
        # once another thread has run an OpenMP parallel region, the runtime counts more
        # threads than cores and synchronises every parallel op the slow way (a batch-64
        # decode step of the wide bench model took 76 ms here instead of 53).
        assert self._loop is not None
        try:
            self.engine = LLMEngine(self.config)
        except BaseException as exc:
            self._loop.call_soon_threadsafe(ready.set_exception, exc)
            return
        self.tokenizer = self.engine.tokenizer
        self.vocab_size = self.engine.vocab_size
        self.max_model_len = self.engine.max_model_len
        self._stats = self.engine.stats()
        self._loop.call_soon_threadsafe(ready.set_result, None)
        try:
            self._run()
        except Exception as exc:
            # A bug in a step must not leave callers waiting forever on dead streams.
            log.exception("engine_failed")
            self._stopping = True
            self._fail_all(f"the engine stopped: {exc!r}")

    async def shutdown(self) -> None:
        """Stop the engine thread; unfinished requests end with an abort."""
        if self._thread is None:
            return
        self._stopping = True
        self._inbox.put(None)
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def add_request(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams,
        priority: Priority = Priority.INTERACTIVE,
        deadline_s: float | None = None,
        stream: bool = True,
    ) -> RequestStream:
        """Validate and queue a request; iterate the returned stream for its outputs.

        With `stream=False` the only output is the final one, carrying every token.

        Raises:
            InvalidRequestError: bad input, with the offending field.
            QueueFullError: too many interactive requests are waiting.
            EngineStoppedError: the engine is not running.
        """
        if self._thread is None or self._stopping or self._loop is None:
            raise EngineStoppedError("the engine is not running")
        token_ids = self.engine.tokenize(prompt, prompt_token_ids, params)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if priority is Priority.INTERACTIVE:
                num_waiting = self.stats().num_waiting_interactive + self._num_queued_interactive
                if num_waiting >= self.config.max_waiting_interactive:
                    raise QueueFullError(
                        f"{num_waiting} interactive requests are waiting; retry later"
                    )
                self._num_queued_interactive += 1
            request_stream = RequestStream(request_id, self)
            self._streams[request_id] = request_stream
        self._inbox.put(
            _Add(request_id, token_ids, params, priority, deadline_s, time.monotonic(), stream)
        )
        self._wakeup.set()
        return request_stream

    def abort(self, request_id: str) -> None:
        """Abort a request; harmless if it already finished."""
        self._inbox.put(_Abort(request_id))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        if self._stats is None:
            raise EngineStoppedError("the engine has not started")
        return self._stats

    # ---- engine thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._drain_inbox():
                break
            if not self.engine.has_unfinished:
                self._publish_stats()
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            # Requests that arrived during the last step's final layers start on their own
            # before the next regular step (which would carry the lane's running decodes).
            self._run_urgent_step([])
            outputs = self.engine.step(self._between_layers)
            self._publish_stats()
            self._deliver(outputs)
        self._abort_all()

    def _between_layers(self) -> None:
        """Inside a step's forward pass: start interactive requests that arrived meanwhile."""
        if not self._num_queued_interactive:  # read without the lock: a late one waits a layer
            return
        outputs: list[RequestOutput] = []
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                outputs.extend(self._admit(cmd))
            else:
                # An abort frees blocks the step in flight may still write: apply it after.
                self._deferred.append(cmd)
        self._run_urgent_step(outputs)

    def _run_urgent_step(self, outputs: list[RequestOutput]) -> None:
        """Run an urgent step and deliver its outputs after `outputs`."""
        urgent = self.engine.urgent_step()
        if urgent:
            # Stats first, as after every step: whoever has seen a request's token sees
            # the request in the stats.
            self._publish_stats()
        self._deliver(outputs + urgent)

    def _drain_inbox(self) -> bool:
        """Apply queued commands; False once shutdown was requested."""
        outputs: list[RequestOutput] = []
        keep_running = True
        while True:
            if self._deferred:
                cmd = self._deferred.popleft()
            else:
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if cmd is None:
                keep_running = False
            elif isinstance(cmd, _Add):
                outputs.extend(self._admit(cmd))
            else:
                out = self.engine.abort(cmd.request_id)
                if out is not None:
                    outputs.append(out)
        self._deliver(outputs)
        return keep_running

    def _admit(self, cmd: _Add) -> list[RequestOutput]:
        if cmd.priority is Priority.INTERACTIVE:
            with self._lock:
                self._num_queued_interactive -= 1
        try:
            self.engine.add_request(
                cmd.request_id,
                prompt_token_ids=cmd.prompt_token_ids,
                params=cmd.params,
                priority=cmd.priority,
                deadline_s=cmd.deadline_s,
                arrival_time_s=cmd.arrival_time_s,
                stream=cmd.stream,
            )
        except Exception as exc:  # validated already; anything here is an engine fault
            log.exception("admit_failed", request_id=cmd.request_id)
            return [
                RequestOutput(
                    cmd.request_id, finished=True, finish_reason=FinishReason.ERROR, error=str(exc)
                )
            ]
        return []

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self._stats = stats
        for listener in self._listeners:
            listener(stats)

    def add_stats_listener(self, listener: Callable[[EngineStats], None]) -> None:
        """Call `listener` on the engine thread after every step (keep it cheap)."""
        self._listeners.append(listener)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream._put(out)

    def _fail_all(self, error: str) -> None:
        """End every request with an error, returning what blocks the engine can."""
        for request_id in list(self.engine._requests):
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
        outputs = [
            RequestOutput(request_id, finished=True, finish_reason=FinishReason.ERROR, error=error)
            for request_id in list(self._streams)
        ]
        with contextlib.suppress(Exception):
            self._publish_stats()
        self._deliver(outputs)

    def _abort_all(self) -> None:
        outputs = [
            out
            for request_id in list(self.engine._requests)
            if (out := self.engine.abort(request_id)) is not None
        ]
        self._publish_stats()
        self._deliver(outputs)
