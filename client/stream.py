"""A GenerateStream call as text deltas, with the whole response once it has ended."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType

from twolane.v1 import generate_pb2


class AsyncTextStream:
    """Iterate for the text as it arrives; `response` is the whole reply once the
    iteration has ended (text, token ids, finish reason, usage, timing, request id).

    Leaving early (break, an exception, `aclose()`, the `async with` block's end)
    cancels the call on the server, which frees what the request held there.
    """

    def __init__(self, chunks: AsyncGenerator[generate_pb2.GenerateStreamResponse, None]) -> None:
        self._chunks = chunks
        self._response = generate_pb2.GenerateResponse()
        self._finished = False

    @property
    def response(self) -> generate_pb2.GenerateResponse:
        """Everything received so far: the whole response when `finished`."""
        return self._response

    @property
    def finished(self) -> bool:
        return self._finished

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        while True:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._finished = True
                raise
            self._add(chunk)
            if chunk.text:
                return chunk.text

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _add(self, chunk: generate_pb2.GenerateStreamResponse) -> None:
        response = self._response
        response.text += chunk.text
        response.token_ids.extend(chunk.token_ids)
        response.logprobs.extend(chunk.logprobs)
        response.request_id = chunk.request_id or response.request_id
        if chunk.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
            response.finish_reason = chunk.finish_reason
            response.usage.CopyFrom(chunk.usage)
            response.timing.CopyFrom(chunk.timing)
