"""Sampling filters: greedy, top-k, top-p, and per-request generators."""

from __future__ import annotations

import dataclasses

import torch

from twolane.models.batch import SamplingRow
from twolane.models.sampling import make_generator, sample


def draws(logits: torch.Tensor, row: SamplingRow, n: int = 300) -> set[int]:
    row = dataclasses.replace(row, generator=make_generator(0))
    return {sample(logits[None], [row]).token_ids[0] for _ in range(n)}


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 1.0]])
    out = sample(logits, [SamplingRow(logprobs=True), SamplingRow()])
    assert out.token_ids == [1, 0]
    assert out.logprobs is not None
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 0]]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected)


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    assert draws(logits, SamplingRow(temperature=5.0, top_k=2)) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert draws(logits, SamplingRow(temperature=1.0, top_p=0.75)) == {0, 1}
    assert draws(logits, SamplingRow(temperature=1.0, top_p=0.5)) == {0}


def test_same_seed_same_draws() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    a = SamplingRow(temperature=1.0, generator=make_generator(42))
    b = SamplingRow(temperature=1.0, generator=make_generator(42))
    seq_a = [sample(logits, [a]).token_ids[0] for _ in range(20)]
    seq_b = [sample(logits, [b]).token_ids[0] for _ in range(20)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1


def test_a_temperature_too_small_to_divide_by_is_greedy() -> None:
    """1.175e-38 is a float32 a client can send: dividing logits by it overflows to inf,
    and multinomial over the resulting NaN probabilities raises."""
    logits = torch.tensor([[0.5, 2.0, 1.0]])
    out = sample(logits, [SamplingRow(temperature=1.175e-38, generator=make_generator(0))])
    assert out.token_ids == [1]
