"""The OpenAI-compatible HTTP API over one engine core: completions, chat, models, health.

Handlers are thin adapters, as the gRPC servicer's are: the body in (pydantic, unknown
fields refused), the one validator, the engine at interactive priority, the OpenAI
shapes out (openai_format). Errors become OpenAI error objects in one place
(`openai_errors`). The caller (http_auth.CallScope) is counted against its tenant's
quotas as over gRPC, and its requests run under its tenant. A client that disconnects
aborts its requests in the engine, so their KV blocks come back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from twolane.scheduler.client import EngineClient
from twolane.scheduler.request import Priority
from twolane.services import convert
from twolane.services.auth import current_principal
from twolane.services.availability import Availability
from twolane.services.errors import UnavailableError
from twolane.services.generation import RequestOutput, generate, trace_phases
from twolane.services.http_errors import ModelNotFoundError, http_error
from twolane.services.openai_format import (
    ChoiceStream,
    Reply,
    TokenText,
    chunk,
    error_body,
    new_id,
    response_body,
    usage_chunk,
)
from twolane.services.openai_schema import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    ChatCompletionRequest,
    CompletionRequest,
    generate_requests,
    parse,
)
from twolane.services.prompts import ModelPrompts
from twolane.services.quotas import Reservation, TenantQuotas
from twolane.services.validation import ModelLimits, ValidRequest, validate_generate

log = structlog.get_logger(__name__)

T = TypeVar("T")
Handler = Callable[..., Awaitable[Response]]
_DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


class ClientGoneError(Exception):
    """The client disconnected before its answer was ready."""


def json_response(
    body: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(_encode(body), status_code, headers, media_type="application/json")


def openai_errors(handler: Handler) -> Handler:
    """Wrap a route so that every exception becomes an OpenAI error response."""

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Response:
        try:
            return await handler(*args)
        except ClientGoneError:
            return Response(status_code=499)  # nobody reads it
        except HTTPException as exc:  # Starlette's own, e.g. a malformed multipart body
            return json_response(
                error_body(str(exc.detail), "invalid_request_error"), exc.status_code
            )
        except Exception as exc:
            error = http_error(exc)
            if error.status < 500 or error.status == 503:
                log.info("request failed", status=error.status, error=error.body["error"])
            return json_response(error.body, error.status, error.headers)

    return wrapper


async def not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods, in the same error shape as everything else."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}"
    return json_response(error_body(message, "invalid_request_error"), status)


class EventStream(StreamingResponse):
    """Server-sent events that close their iterator, and run `on_close`, however the
    response ends (done, client gone before or after the first event, send failed), so
    the engine requests behind it are aborted at once and their quota settled."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(content)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._on_close()


class CompletionsAPI:
    """`/v1/completions`, `/v1/chat/completions`, `/v1/models` and `/health`.

    Args:
        engine: a ready client of the engine core.
        prompts: the model's tokenizer and chat template.
        model_name: the model id clients name (`--served-model-name`).
        quotas: the tenants' limits, enforced here as in a gRPC frontend.
        nats: whether NATS answers (the Batch API's health), when this front has it.
    """

    def __init__(
        self,
        engine: EngineClient,
        prompts: ModelPrompts,
        model_name: str,
        quotas: TenantQuotas | None = None,
        nats: Availability | None = None,
    ) -> None:
        assert engine.info is not None, "the engine client must be ready"
        self._engine = engine
        self._prompts = prompts
        self.model_name = model_name
        self._quotas = quotas or TenantQuotas()
        self._nats = nats
        self.limits = ModelLimits(
            vocab_size=engine.info.vocab_size, max_model_len=engine.info.max_model_len
        )
        self._created = int(time.time())
        decode = prompts.tokenizer.decode
        self.token_text: TokenText = functools.lru_cache(maxsize=1 << 16)(lambda t: decode([t]))

    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]

    def check_model(self, model: str | None, field: str = "model") -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFoundError(
                f"{field}: the model {model!r} does not exist; this server serves "
                f"{self.model_name!r}"
            )

    # ---- routes ------------------------------------------------------------------

    @openai_errors
    async def completions(self, request: Request) -> Response:
        body = parse(CompletionRequest, await request.body())
        return await self._serve(request, body, COMPLETIONS)

    @openai_errors
    async def chat_completions(self, request: Request) -> Response:
        body = parse(ChatCompletionRequest, await request.body())
        return await self._serve(request, body, CHAT_COMPLETIONS)

    @openai_errors
    async def list_models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [self._model_object()]})

    @openai_errors
    async def get_model(self, request: Request) -> Response:
        self.check_model(request.path_params["model"])
        return json_response(self._model_object())

    @openai_errors
    async def health(self, request: Request) -> Response:
        """200 while the engine core runs (completions work); `batches` says whether the
        Batch API's NATS answers."""
        if not self._engine.is_ready:
            raise UnavailableError("the engine is not running")
        batches = "ok" if self._nats is None or self._nats.available else "unavailable"
        return json_response({"status": "ok", "model": self.model_name, "batches": batches})

    def _model_object(self) -> dict[str, Any]:
        assert self._engine.info is not None
        return {
            "id": self.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "twolane",
            "max_model_len": self._engine.info.max_model_len,
        }

    # ---- one request ---------------------------------------------------------------

    async def _serve(
        self, request: Request, body: CompletionRequest | ChatCompletionRequest, endpoint: str
    ) -> Response:
        self.check_model(body.model)
        valids = [
            validate_generate(r, self.limits, self._prompts)
            for r in generate_requests(body, self.limits.max_model_len)
        ]
        principal = current_principal()
        num_tokens = sum(len(v.prompt_token_ids) + v.params.max_tokens for v in valids)
        reservation = self._quotas.admit(principal, num_tokens * body.n)
        reply = Reply(
            id=new_id(endpoint),
            endpoint=endpoint,
            model=self.model_name,
            created=int(time.time()),
            n=body.n,
            logprobs=body.logprobs is not None and body.logprobs is not False,
            return_token_ids=body.return_token_ids,
        )
        arrival_s = time.monotonic()
        used = Used(reservation, arrival_s)
        streams = [
            used.counted(i, s)
            for i, s in enumerate(
                self._start(reply, valids, body.seed, principal.tenant, stream=body.stream)
            )
        ]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = merged(streams)

            async def close() -> None:
                # A cancelled first read may still be unwinding (and closing) it.
                with contextlib.suppress(RuntimeError):
                    await events.aclose()  # type: ignore[attr-defined]
                used.settle()

            try:
                # The first update comes before the headers: a request the engine refuses
                # (queue full, engine down) still gets its proper status code.
                first = await until_disconnected(request, anext(events))
            except BaseException:
                await close()
                raise
            return EventStream(
                self._events(reply, first, events, len(streams), include_usage), close
            )
        try:
            updates = await until_disconnected(request, collect_all(streams))
        finally:
            used.settle()
        total_s = time.monotonic() - arrival_s
        results = [
            convert.generate_response(f"{reply.id}-{i}", u, total_s) for i, u in enumerate(updates)
        ]
        self._log_finished(reply, sum(r.usage.completion_tokens for r in results))
        return json_response(response_body(reply, results, self.token_text))

    def _start(
        self,
        reply: Reply,
        valids: list[ValidRequest],
        seed: int | None,
        tenant: str,
        stream: bool,
    ) -> list[AsyncIterator[RequestOutput]]:
        """The engine requests of every choice (nothing is sent before they are read)."""
        streams: list[AsyncIterator[RequestOutput]] = []
        for valid in valids:
            for j in range(reply.n):
                params = valid.params
                if seed is not None and j:
                    # n samples of one seed would all be the same sample.
                    params = msgspec.structs.replace(params, seed=seed + j)
                streams.append(
                    generate(
                        self._engine,
                        self._prompts.tokenizer,
                        f"{reply.id}-{len(streams)}",
                        ValidRequest(valid.prompt_token_ids, params),
                        Priority.INTERACTIVE,
                        None,
                        stream=stream,
                        tenant=tenant,
                    )
                )
        return streams

    async def _events(
        self,
        reply: Reply,
        first: tuple[int, RequestOutput],
        events: AsyncIterator[tuple[int, RequestOutput]],
        num_choices: int,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        sent = [ChoiceStream() for _ in range(num_choices)]

        def event(index: int, out: RequestOutput) -> bytes:
            body = chunk(reply, index, out, sent[index], self.token_text, include_usage)
            return b"data: " + _encode(body) + b"\n\n"

        try:
            yield event(*first)
            async for index, out in events:
                yield event(index, out)
            if include_usage:
                yield b"data: " + _encode(usage_chunk(reply, sent)) + b"\n\n"
            self._log_finished(reply, sum(c.num_output_tokens for c in sent))
        except Exception as exc:
            # The status line is out already: the error is the stream's last event.
            yield b"data: " + _encode(http_error(exc).body) + b"\n\n"
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        yield _DONE

    def _log_finished(self, reply: Reply, num_completion_tokens: int) -> None:
        log.info(
            "request finished",
            completion_id=reply.id,
            endpoint=reply.endpoint,
            completion_tokens=num_completion_tokens,
        )


class Used:
    """What one HTTP request's engine requests used, for its quota reservation: the
    reservation starts with the first output and is settled with the tokens used."""

    def __init__(self, reservation: Reservation, arrival_s: float) -> None:
        self._reservation = reservation
        self._arrival_s = arrival_s
        self._num_tokens: dict[int, int] = {}

    async def counted(
        self, index: int, stream: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for out in stream:
                self._reservation.started()
                self._num_tokens[index] = out.num_prompt_tokens + out.num_output_tokens
                if out.finished:
                    trace_phases(out, self._arrival_s)
                yield out

    def settle(self) -> None:
        self._reservation.settle(sum(self._num_tokens.values()))


async def collect_all(streams: list[AsyncIterator[RequestOutput]]) -> list[list[RequestOutput]]:
    """Every update of every stream; the first failure cancels (aborts) the others."""

    async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            return [out async for out in stream]

    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of all `streams` as they come, each with its stream's index. Closing
    this closes them all; the first failure of one ends it."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    end = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    queue.put_nowait((index, item, None))
        except Exception as exc:
            queue.put_nowait((index, end, exc))
            return
        queue.put_nowait((index, end, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is end:
                num_open -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; a client that disconnects first cancels it (ClientGoneError)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            # Its cleanup (the aborts) runs as the task unwinds; nobody reads its end.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGoneError()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
