"""`AsyncClient`: the twolane API for asyncio code, with deadlines, retries and waiting.

Every call has a deadline (`ClientConfig.deadline_s`, retries included), sends an
`x-request-id` (the caller's, or a new one) and the current OpenTelemetry context,
and raises a typed `TwolaneError` on failure. Unary calls are retried as retry.py
says; a stream is retried only until its first message has arrived, since after that
the caller has seen text a second attempt would repeat.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc
from opentelemetry import propagate

from twolane.client import requests
from twolane.client.batch import BatchInput, BatchItem, BatchProgress, run_batch
from twolane.client.config import ClientConfig
from twolane.client.errors import (
    REQUEST_ID_KEY,
    DeadlineExceeded,
    TwolaneError,
    WaitTimeout,
    from_rpc_error,
)
from twolane.client.events import EventsLost, EventSubscription, JobEvents
from twolane.client.requests import FINAL_STATES, Message, Prompt, Sampling, Tier
from twolane.client.retry import ClientStats, Retrier
from twolane.client.stream import AsyncTextStream
from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc, jobs_pb2

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from twolane.v1.inference_pb2_grpc import InferenceServiceAsyncStub

Q = TypeVar("Q")
R = TypeVar("R")


def config_of(config: ClientConfig | str | Sequence[str] | None) -> ClientConfig:
    """A config from a config, a target, a list of targets or (None) the environment."""
    if isinstance(config, ClientConfig):
        return config
    if config is None:
        return ClientConfig.from_env()
    targets = (config,) if isinstance(config, str) else tuple(config)
    return ClientConfig.from_env(targets=targets)


class AsyncClient:
    """A client of one or more twolane servers; use it as `async with AsyncClient(...)`.

    Args:
        config: a `ClientConfig`, a target (HOST:PORT), a list of targets, or None for
            `ClientConfig.from_env()` (a target given alone also takes the rest from
            the environment).
    """

    def __init__(self, config: ClientConfig | str | Sequence[str] | None = None) -> None:
        self.config = config_of(config)
        self.stats = ClientStats()
        self._retrier = Retrier(self.config.retry, self.stats, self.config.on_retry)
        self._rng = random.Random()
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[InferenceServiceAsyncStub] = []
        self._turns = itertools.count()
        self._events = JobEvents(self.config)
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels and the NATS connection; calls in flight are cancelled."""
        self._closed = True
        await self._events.close()
        for channel in self._channels:
            await channel.close()
        self._channels, self._stubs = [], []

    # ---- the interactive lane -----------------------------------------------------

    async def generate(
        self,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> generate_pb2.GenerateResponse:
        """One completion, whole. `prompt` is text, token ids or a GenerateRequest;
        `messages` a conversation instead; keyword arguments are SamplingParams fields."""
        request = requests.generate_request(prompt, messages, sampling)
        return await self._unary(
            "Generate", lambda stub: stub.Generate, request, request_id, timeout_s
        )

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> generate_pb2.GenerateResponse:
        """The model's next turn in a conversation (rendered with its chat template)."""
        return await self.generate(
            messages=messages, request_id=request_id, timeout_s=timeout_s, **sampling
        )

    def stream(
        self,
        prompt: Prompt | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[Sampling],
    ) -> AsyncTextStream:
        """A completion as it is generated: iterate for text deltas, then read
        `.response`. The call starts at the first iteration."""
        request = requests.stream_request(requests.generate_request(prompt, messages, sampling))
        return AsyncTextStream(self._stream(request, request_id, timeout_s))

    async def get_stats(
        self, *, request_id: str | None = None, timeout_s: float | None = None
    ) -> inference_pb2.GetStatsResponse:
        """The engine's counters (of the next target in turn)."""
        request = inference_pb2.GetStatsRequest()
        return await self._unary(
            "GetStats", lambda stub: stub.GetStats, request, request_id, timeout_s
        )

    # ---- the batch lane -----------------------------------------------------------

    async def submit(
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
        """Queue a durable job and return its id at once.

        Without `idempotency_key` the client makes one, so that its own retries never
        queue a second job; pass your own to make resubmitting (after a crash, say)
        return the first job. A SubmitJobRequest is sent as it is (with a key added when
        it has none). With `webhook_url` the server POSTs the job's completion event
        there, signed, when the job ends (README, "Webhooks").
        """
        if isinstance(prompt, jobs_pb2.SubmitJobRequest):
            if messages is not None or sampling:
                raise TypeError("a SubmitJobRequest carries its own messages and params")
            submission = jobs_pb2.SubmitJobRequest()
            submission.CopyFrom(prompt)
            submission.idempotency_key = (
                submission.idempotency_key or requests.new_idempotency_key()
            )
        else:
            request = requests.generate_request(prompt, messages, sampling)
            submission = requests.submit_request(
                request, tier, idempotency_key, custom_id, job_deadline_s, webhook_url
            )
        return await self._unary(
            "SubmitJob", lambda stub: stub.SubmitJob, submission, request_id, timeout_s
        )

    async def result(
        self, job_id: str, *, request_id: str | None = None, timeout_s: float | None = None
    ) -> jobs_pb2.GetResultResponse:
        """The job's state, and its result once it has one."""
        request = jobs_pb2.GetResultRequest(job_id=job_id)
        return await self._unary(
            "GetResult", lambda stub: stub.GetResult, request, request_id, timeout_s
        )

    async def cancel(
        self, job_id: str, *, request_id: str | None = None, timeout_s: float | None = None
    ) -> jobs_pb2.CancelJobResponse:
        """Cancel a queued or running job (a finished one keeps its state)."""
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return await self._unary(
            "CancelJob", lambda stub: stub.CancelJob, request, request_id, timeout_s
        )

    async def wait(self, job_id: str, timeout_s: float | None = None) -> jobs_pb2.GetResultResponse:
        """The job's final state and result, as soon as it has them.

        Listens on `twolane.results.<tenant>.<job_id>` when NATS can be reached (checking
        GetResult once after subscribing, and every `event_recheck_s` while listening),
        and otherwise polls GetResult with exponential backoff and full jitter.

        Raises:
            WaitTimeout: the job had not finished after `timeout_s` (it goes on).
        """
        deadline = _Deadline(timeout_s)
        subscription = await self._events.subscribe(job_id)
        if subscription is None:
            return await self._poll(job_id, deadline)
        try:
            return await self._listen(job_id, subscription, deadline)
        except EventsLost:
            pass
        finally:
            await subscription.close()
        return await self._poll(job_id, deadline)

    async def watch(self, job_id: str, timeout_s: float | None = None) -> jobs_pb2.JobEvent | None:
        """The job's completion event from NATS alone (no gRPC call): the stored one if
        the job has finished, else the next one within `timeout_s`; None if none came.

        Raises:
            EventsUnreachable: no NATS URL, or NATS cannot be reached or refused us.
        """
        return await self._events.watch(job_id, timeout_s)

    async def submit_and_wait(
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
        """`submit`, then `wait` for that job (up to `timeout_s`)."""
        submitted = await self.submit(
            prompt,
            messages=messages,
            tier=tier,
            idempotency_key=idempotency_key,
            custom_id=custom_id,
            job_deadline_s=job_deadline_s,
            webhook_url=webhook_url,
            **sampling,
        )
        return await self.wait(submitted.job_id, timeout_s)

    def batch(
        self,
        inputs: Iterable[BatchInput],
        *,
        concurrency: int = 32,
        tier: Tier = "bulk",
        timeout_s: float | None = None,
        on_progress: Callable[[BatchProgress], None] | None = None,
        **sampling: Unpack[Sampling],
    ) -> AsyncIterator[BatchItem]:
        """Run every input as a job, at most `concurrency` unfinished at once, and yield
        each `BatchItem` (its index and input, the result or the error) as it finishes.

        Prompts get `custom_id` = their index. `on_progress` is called once per item,
        before it is yielded. Leaving early stops submitting; jobs already queued run on.
        """
        return run_batch(self, inputs, concurrency, tier, timeout_s, sampling, on_progress)

    # ---- calls, retries and deadlines ---------------------------------------------

    def _stub(self, turn: int) -> InferenceServiceAsyncStub:
        if self._closed:
            raise RuntimeError("the client is closed")
        if not self._stubs:
            credentials = self.config.credentials()
            for target in self.config.targets:
                channel = (
                    grpc.aio.secure_channel(target, credentials)
                    if credentials is not None
                    else grpc.aio.insecure_channel(target)
                )
                self._channels.append(channel)
                self._stubs.append(inference_pb2_grpc.InferenceServiceStub(channel))
        return self._stubs[turn % len(self._stubs)]

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        trace: dict[str, str] = {}
        propagate.inject(trace)  # nothing when no span is current
        return (*self.config.call_metadata(), (REQUEST_ID_KEY, request_id), *trace.items())

    def _timeout_s(self, timeout_s: float | None) -> float | None:
        return self.config.deadline_s if timeout_s is None else timeout_s

    async def _unary(
        self,
        method: str,
        pick: Callable[[InferenceServiceAsyncStub], grpc.aio.UnaryUnaryMultiCallable[Q, R]],
        request: Q,
        request_id: str | None,
        timeout_s: float | None,
    ) -> R:
        request_id = request_id or requests.new_request_id()
        metadata = self._metadata(request_id)
        deadline = _Deadline(self._timeout_s(timeout_s))
        turn = next(self._turns)
        self.stats.num_calls += 1
        for attempt in itertools.count(1):
            call = pick(self._stub(turn + attempt - 1))
            self.stats.num_attempts += 1
            try:
                response = await call(request, timeout=deadline.remaining_s(), metadata=metadata)
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err, request_id)
                await self._before_retry(method, attempt, error, deadline)
                continue
            self._retrier.succeeded()
            return response
        raise AssertionError("unreachable")

    async def _before_retry(
        self, method: str, attempt: int, error: TwolaneError, deadline: _Deadline
    ) -> None:
        """Sleep until the next attempt, or raise `error` when there is none."""
        delay_s = self._retrier.delay_s(method, attempt, error, deadline.remaining_s())
        if delay_s is None:
            raise error from None  # the grpc error it came from stays out of tracebacks
        await asyncio.sleep(delay_s)

    async def _stream(
        self,
        request: generate_pb2.GenerateStreamRequest,
        request_id: str | None,
        timeout_s: float | None,
    ) -> AsyncGenerator[generate_pb2.GenerateStreamResponse, None]:
        request_id = request_id or requests.new_request_id()
        metadata = self._metadata(request_id)
        deadline = _Deadline(self._timeout_s(timeout_s))
        turn = next(self._turns)
        self.stats.num_calls += 1
        for attempt in itertools.count(1):
            stub = self._stub(turn + attempt - 1)
            call = stub.GenerateStream(request, timeout=deadline.remaining_s(), metadata=metadata)
            self.stats.num_attempts += 1
            messages = call.__aiter__()
            try:
                try:
                    first = await messages.__anext__()
                except StopAsyncIteration:
                    self._retrier.succeeded()
                    return
                except grpc.aio.AioRpcError as err:
                    error = from_rpc_error(err, request_id)
                    await self._before_retry("GenerateStream", attempt, error, deadline)
                    continue
                self._retrier.succeeded()
                yield first
                # The caller has text now: a failure from here on is theirs to see.
                try:
                    async for message in messages:
                        yield message
                except grpc.aio.AioRpcError as err:
                    raise from_rpc_error(err, request_id) from None
                return
            finally:
                call.cancel()

    # ---- waiting ------------------------------------------------------------------

    async def _listen(
        self, job_id: str, subscription: EventSubscription, deadline: _Deadline
    ) -> jobs_pb2.GetResultResponse:
        while True:
            # Subscribed first, then asked: an event published in between still arrives.
            result = await self._check(job_id, deadline)
            if result.state in FINAL_STATES:
                return result
            remaining_s = deadline.remaining_s()
            listen_s = self.config.event_recheck_s
            event = await subscription.next_event(
                listen_s if remaining_s is None else min(listen_s, remaining_s)
            )
            if event is not None and event.state in FINAL_STATES:
                return requests.result_of_event(event)

    async def _poll(self, job_id: str, deadline: _Deadline) -> jobs_pb2.GetResultResponse:
        for poll in itertools.count():
            result = await self._check(job_id, deadline)
            if result.state in FINAL_STATES:
                return result
            cap_s = min(self.config.poll_max_s, self.config.poll_initial_s * 2 ** min(poll, 32))
            delay_s = self._rng.uniform(0.0, cap_s)
            remaining_s = deadline.remaining_s()
            await asyncio.sleep(delay_s if remaining_s is None else min(delay_s, remaining_s))
        raise AssertionError("unreachable")

    async def _check(self, job_id: str, deadline: _Deadline) -> jobs_pb2.GetResultResponse:
        """GetResult within what is left of the wait; WaitTimeout once nothing is."""
        remaining_s = deadline.remaining_s()
        if remaining_s is not None and remaining_s <= 0:
            raise WaitTimeout(f"job {job_id} has not finished within {deadline.timeout_s:g} s")
        call_s = self.config.deadline_s
        if remaining_s is not None:
            call_s = remaining_s if call_s is None else min(call_s, remaining_s)
        try:
            return await self.result(job_id, timeout_s=call_s)
        except DeadlineExceeded:
            if deadline.expired:
                raise WaitTimeout(
                    f"job {job_id} has not finished within {deadline.timeout_s:g} s"
                ) from None
            raise


class _Deadline:
    """A point in time on the monotonic clock, or none."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._at_s = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining_s(self) -> float | None:
        return None if self._at_s is None else max(0.0, self._at_s - time.monotonic())

    @property
    def expired(self) -> bool:
        return self._at_s is not None and time.monotonic() >= self._at_s
