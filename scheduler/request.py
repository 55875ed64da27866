"""Request-level types shared by the engine and the services that drive it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
    ERROR = "error"  # the engine failed while running the request


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy decoding.

    `top_k == 0` and `top_p == 1.0` disable those filters. `seed` makes sampling
    reproducible for one request whatever else shares the batch.
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

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RequestOutput:
    """One incremental update for a request.

    `new_token_ids` and `new_text` hold only what this update adds; `text` is
    never split inside a multi-byte character. The last update of a request has
    `finished=True` and a `finish_reason`.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time_s: float = 0.0
    ttft_s: float | None = None
    error: str | None = None
