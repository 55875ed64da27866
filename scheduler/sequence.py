"""A request as the scheduler sees it: tokens, progress, blocks and priority."""

from __future__ import annotations

import enum

import torch

from twolane.scheduler.request import FinishReason, Priority, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One generation request.

    `token_ids` holds the prompt followed by the generated tokens. The KV of the
    first `num_computed_tokens` of them is in the cache; the scheduler feeds the
    rest to the model (a prompt chunk, or the one token sampled last step).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: Priority,
        arrival_index: int,
        arrival_time_s: float,
        deadline_s: float | None = None,
        generator: torch.Generator | None = None,
        tenant: str = "default",
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens: int = len(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.arrival_index = arrival_index
        self.arrival_time_s = arrival_time_s
        self.deadline_s = deadline_s
        self.generator = generator
        self.tenant = tenant
        # Its place among the waiting work of its class, fair across tenants (set by the
        # scheduler on first admission, kept through preemptions).
        self.fair_tag: int | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens: int = 0
        self.block_table: list[int] = []
        # Chained hashes of this sequence's full blocks, in order, once computed.
        self.block_hashes: list[int] = []
        self.num_cached_tokens: int = 0  # prefix-cache hit at first admission
        self.num_preemptions: int = 0
        self.first_scheduled_time_s: float | None = None
        self.first_token_time_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Scheduling order: class first, then turns fair across tenants (first come first
        served for one tenant), then arrival."""
        return (int(self.priority), self.fair_tag or 0, self.arrival_index)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
