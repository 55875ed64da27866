"""On the real default model, SmolLM2-135M-Instruct in fp32, the engine's greedy tokens
equal transformers' with the same GGUF weights: in one batch, staggered, and through the
chat template.

Real weights hold near-ties that random ones do not: where the referee's own top-2 logit
margin at a position is below NEAR_TIE, the comparison stops before that position (a
float-rounding difference may flip it, and everything after it follows a different
prefix). How many positions the rule left out is printed; nothing else is loosened.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from engine_driver import run_staggered
from smollm2 import GreedyRun, hf_smollm2_greedy, smollm2_dir

from twolane.models.chat import ChatTemplate
from twolane.models.tokenizer import Tokenizer
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import SamplingParams

NEAR_TIE = 1e-3
MAX_NEW_TOKENS = 16
TEXTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "List three primary colors:",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "In 1969, the first humans landed on",
    "Translate to French: Good morning, how are you?",
    "A haiku about the sea:\n",
    "Q: What is 12 times 12?\nA:",
    "The mitochondria is the powerhouse of the",
    "Here is a short story about a robot who learns to paint. It begins in a small town "
    "where nothing ever happens, until one day",
    "1, 2, 3, 4,",
    "Dear team,\n\nI wanted to follow up on yesterday's meeting about the quarterly roadmap "
    "and the open questions on hiring, budget and the launch date. First,",
]
CONVERSATIONS = [
    [("user", "What is the capital of France?")],
    [("system", "You are terse."), ("user", "Name a planet.")],
    [("user", "Hi!"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a fact.")],
]


@dataclass
class Compared:
    num_positions: int = 0
    num_left_out: int = 0


@pytest.fixture(scope="module")
def model_dir() -> object:
    return smollm2_dir()


@pytest.fixture(scope="module")
def prompts(model_dir: object) -> list[list[int]]:
    tokenizer = Tokenizer.from_dir(model_dir)  # type: ignore[arg-type]
    return [tokenizer.encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def references(prompts: list[list[int]]) -> list[GreedyRun]:
    return hf_smollm2_greedy(prompts, MAX_NEW_TOKENS)


def engine(model_dir: object) -> EngineCore:
    return EngineCore(EngineConfig(model=str(model_dir), num_blocks=512, max_num_seqs=32))


def compare(got: list[int], reference: GreedyRun, tally: Compared, label: str) -> None:
    end = next((i for i, m in enumerate(reference.margins) if m < NEAR_TIE), len(got))
    tally.num_positions += len(reference.token_ids)
    tally.num_left_out += len(reference.token_ids) - end
    assert got[:end] == reference.token_ids[:end], label


def greedy(n: int = MAX_NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def test_one_batch_matches_transformers(
    model_dir: object, prompts: list[list[int]], references: list[GreedyRun]
) -> None:
    assert len({len(p) for p in prompts}) >= 12  # prompts of different lengths
    results = run_staggered(
        engine(model_dir), prompts, [greedy()] * len(prompts), [0] * len(prompts)
    )
    tally = Compared()
    for i, reference in enumerate(references):
        compare(results[f"req-{i}"].token_ids, reference, tally, TEXTS[i])
    print(f"one batch: {tally.num_left_out} of {tally.num_positions} positions after a near-tie")


def test_staggered_arrivals_and_lengths_match_transformers(
    model_dir: object, prompts: list[list[int]], references: list[GreedyRun]
) -> None:
    params = [greedy(6 + (i * 5) % (MAX_NEW_TOKENS - 5)) for i in range(len(prompts))]
    arrivals = [(i * 3) % 7 for i in range(len(prompts))]
    results = run_staggered(engine(model_dir), prompts, params, arrivals, mid_step=True)
    tally = Compared()
    for i, reference in enumerate(references):
        cut = GreedyRun(
            reference.token_ids[: params[i].max_tokens], reference.margins[: params[i].max_tokens]
        )
        compare(results[f"req-{i}"].token_ids, cut, tally, TEXTS[i])
    print(f"staggered: {tally.num_left_out} of {tally.num_positions} positions after a near-tie")


def test_chat_template_prompts_match_transformers(model_dir: object) -> None:
    template = ChatTemplate.from_dir(model_dir)  # type: ignore[arg-type]
    tokenizer = Tokenizer.from_dir(model_dir)  # type: ignore[arg-type]
    assert template is not None
    prompts = [
        tokenizer.encode(template.render(c), add_special_tokens=False) for c in CONVERSATIONS
    ]
    references = hf_smollm2_greedy(prompts, MAX_NEW_TOKENS)
    results = run_staggered(engine(model_dir), prompts, [greedy()] * len(prompts), [0, 1, 2])
    tally = Compared()
    for i, reference in enumerate(references):
        compare(results[f"req-{i}"].token_ids, reference, tally, str(CONVERSATIONS[i]))
    print(f"chat: {tally.num_left_out} of {tally.num_positions} positions after a near-tie")
