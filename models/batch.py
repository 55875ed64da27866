"""What the model runner is told to do in one step, in plain values.

The scheduler describes a step with these types; the runner never sees its sequences,
requests or priorities, so `models/` depends on nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingRow:
    """How to pick one sequence's next token. `temperature == 0` is greedy.

    `top_k == 0` and `top_p == 1.0` turn those filters off. `generator` draws this row's
    random numbers, so a seeded request samples the same tokens whatever shares the batch.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    logprobs: bool = False


@dataclass(frozen=True)
class BatchSequence:
    """One sequence's share of a step.

    Args:
        token_ids: the tokens this step feeds (a prompt chunk, or the last sampled token).
        num_computed_tokens: tokens of the sequence whose KV is already cached; the new
            tokens take the positions after them.
        block_table: the sequence's KV blocks, covering all its tokens after this step.
        sampling: how to pick the next token when this step reaches the sequence's last
            token; None when it does not (an unfinished prompt chunk).
    """

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    sampling: SamplingRow | None


class ForwardHook(Protocol):
    """Called by the decoder at safe points of a forward pass: between the attention and
    the MLP of every layer, and after every layer.

    The engine uses it to run another, small step (an urgent step, on other sequences)
    before the one in flight goes on. It may run a whole forward pass of its own: every
    step carries its own attention metadata, and at these points the outer step has
    written the K/V of its tokens for the layers done, so nothing of it is overwritten.
    Checking at half-layer points halves what a new request waits for the layer in flight.
    """

    def safe_point(self) -> None: ...
