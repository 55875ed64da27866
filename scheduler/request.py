"""Request-level types shared by the engine core and its clients. No torch here: the
frontends import this module and never load torch."""

from __future__ import annotations

import enum

import msgspec


class Priority(enum.IntEnum):
    """Scheduling classes; a lower value is served first."""

    INTERACTIVE = 0
    URGENT = 1
    STANDARD = 2
    BULK = 3

    @property
    def is_batch(self) -> bool:
        return self is not Priority.INTERACTIVE


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the caller
    DEADLINE = "deadline"  # the request's deadline passed
    ERROR = "error"  # the engine failed or refused the request (see ErrorCode)


class ErrorCode(enum.Enum):
    """Why a request finished with FinishReason.ERROR."""

    QUEUE_FULL = "queue_full"  # too many interactive requests wait: retry later
    REJECTED = "rejected"  # the engine cannot run it as given (a client's bug)
    ENGINE_FAILED = "engine_failed"  # a step failed while the request was in it
    ENGINE_DEAD = "engine_dead"  # the engine core went away with the request in flight
    ENGINE_STOPPING = "engine_stopping"  # the engine core shut down


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens. `temperature == 0` is greedy decoding.

    `top_k == 0` and `top_p == 1.0` disable those filters. `seed` makes sampling
    reproducible for one request whatever else shares the batch. The values are checked
    once, by the frontend's validator; the engine core takes them as they come. `stop`
    strings are applied by the frontend, which sees text; the core sees token ids only.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
