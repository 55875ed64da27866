"""Benchmark workloads: prompts and output lengths, seeded or read from a JSONL file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RequestSpec:
    """One benchmark request: the prompt's token ids and exactly how many tokens to generate."""

    prompt_token_ids: tuple[int, ...]
    num_output_tokens: int

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class LengthRange:
    """Inclusive bounds of a uniform length distribution."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got {self.low}-{self.high}")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """`"8-512"` or `"64"` (a fixed length)."""
        low, _, high = text.partition("-")
        return cls(int(low), int(high or low))

    def __str__(self) -> str:
        return f"{self.low}-{self.high}" if self.low != self.high else str(self.low)


def random_workload(
    num_requests: int,
    prompt_lens: LengthRange,
    output_lens: LengthRange,
    vocab_size: int,
    seed: int,
) -> list[RequestSpec]:
    """Uniform prompt and output lengths and uniform random token ids, all from `seed`."""
    rng = random.Random(seed)
    specs = []
    for _ in range(num_requests):
        num_prompt = rng.randint(prompt_lens.low, prompt_lens.high)
        prompt = tuple(rng.randrange(vocab_size) for _ in range(num_prompt))
        specs.append(RequestSpec(prompt, rng.randint(output_lens.low, output_lens.high)))
    return specs


def load_jsonl(path: Path, vocab_size: int, num_requests: int | None = None) -> list[RequestSpec]:
    """Read `{"prompt_token_ids": [...], "max_tokens": N}` lines.

    A line may give `prompt_len` instead of token ids; its tokens are then drawn
    at random (seeded by the line number), so traces of lengths alone replay too.
    """
    specs = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt_token_ids" in row:
                prompt = tuple(int(t) for t in row["prompt_token_ids"])
            elif "prompt_len" in row:
                rng = random.Random(line_no)
                prompt = tuple(rng.randrange(vocab_size) for _ in range(int(row["prompt_len"])))
            else:
                raise ValueError(f"{path}:{line_no}: needs prompt_token_ids or prompt_len")
            if not prompt or any(not 0 <= t < vocab_size for t in prompt):
                raise ValueError(f"{path}:{line_no}: empty prompt or token id out of vocabulary")
            num_output = int(row.get("max_tokens", row.get("output_len", 0)))
            if num_output <= 0:
                raise ValueError(f"{path}:{line_no}: max_tokens must be positive")
            specs.append(RequestSpec(prompt, num_output))
            if num_requests is not None and len(specs) == num_requests:
                break
    if not specs:
        raise ValueError(f"{path} holds no requests")
    return specs


def poisson_arrivals(num_requests: int, rate_per_s: float, seed: int) -> list[float]:
    """Arrival offsets in seconds of a Poisson process; the first request comes at 0."""
    rng = random.Random(seed + 1)
    arrivals, now = [], 0.0
    for _ in range(num_requests):
        arrivals.append(now)
        now += rng.expovariate(rate_per_s)
    return arrivals
