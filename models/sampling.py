"""Token sampling: greedy, temperature, top-k, top-p, with per-request generators.

Each sampled request draws from its own seeded `torch.Generator`, one draw per token,
so its tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twolane.models.batch import SamplingRow

# Below this temperature a row is sampled greedily: dividing logits by a temperature
# near zero overflows to inf, and the argmax is what such a temperature means anyway.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each chosen token under the raw logits


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
    """Pick one token per row of `logits` ([num_rows, vocab_size], fp32)."""
    chosen = logits.argmax(dim=-1)
    for index, row in enumerate(rows):
        if row.temperature >= MIN_TEMPERATURE:
            chosen[index] = _sample_row(logits[index], row)
    logprobs = None
    if any(row.logprobs for row in rows):
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
    return SampleResult(token_ids=chosen.tolist(), logprobs=logprobs)


def _sample_row(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    scaled = logits / row.temperature
    if 0 < row.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, row.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= row.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=row.generator)[0]


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
