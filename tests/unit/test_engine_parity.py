"""Greedy tokens equal transformers' `generate()` with the same weights, whatever the batch."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from checkpoints import VOCAB_SIZE, hf_greedy
from engine_driver import record_schedules, run_staggered

from twolane.kernels import native
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import Priority, SamplingParams

PROMPT_LENGTHS = [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24, 31, 33, 40, 47, 64, 70, 4]
MAX_NEW_TOKENS = 14


def make_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]


def staggered_params() -> tuple[list[SamplingParams], list[int]]:
    """Different output lengths and arrival steps, so sequences join and leave mid-flight."""
    params = [
        SamplingParams(max_tokens=4 + (i * 5) % (MAX_NEW_TOKENS - 3), ignore_eos=True)
        for i in range(len(PROMPT_LENGTHS))
    ]
    arrivals = [(i * 3) % 11 for i in range(len(PROMPT_LENGTHS))]
    return params, arrivals


@pytest.fixture(scope="module")
def references(llama_dir: Path, qwen2_dir: Path) -> dict[str, list[list[int]]]:
    return {
        "llama": hf_greedy(llama_dir, make_prompts(0), MAX_NEW_TOKENS),
        "qwen2": hf_greedy(qwen2_dir, make_prompts(0), MAX_NEW_TOKENS),
    }


def check_against_reference(
    engine: EngineCore, reference: list[list[int]], mid_step: bool = False
) -> None:
    params, arrivals = staggered_params()
    urgent = record_schedules(engine, urgent=True)
    lanes = [Priority.INTERACTIVE] * len(params)
    if mid_step:
        # A third are batch jobs from the start and the rest arrive mid-step later, so the
        # urgent steps that start them run beside batch work (and its preemption).
        lanes = [Priority.BULK if i % 3 == 0 else Priority.INTERACTIVE for i in range(len(params))]
        arrivals = [0 if lane.is_batch else a + 1 for a, lane in zip(arrivals, lanes, strict=True)]
    results = run_staggered(
        engine, make_prompts(0), params, arrivals, mid_step=mid_step, priorities=lanes
    )
    for i, p in enumerate(params):
        got = results[f"req-{i}"].token_ids
        assert got == reference[i][: p.max_tokens], f"prompt {i} (length {PROMPT_LENGTHS[i]})"
    assert engine.block_manager.num_used_blocks == 0
    if mid_step:
        assert any(out.scheduled for out in urgent), "no request started inside a step"


@pytest.mark.parametrize("mid_step", [False, True], ids=["between-steps", "mid-step"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers_with_staggered_arrivals(
    arch: str,
    mid_step: bool,
    request: pytest.FixtureRequest,
    references: dict[str, list[list[int]]],
) -> None:
    model_dir = request.getfixturevalue(f"{arch}_dir")
    engine = EngineCore(EngineConfig(model=str(model_dir), num_blocks=256))
    check_against_reference(engine, references[arch], mid_step)


@pytest.mark.parametrize("mid_step", [False, True], ids=["between-steps", "mid-step"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers_under_chunked_prefill_and_preemption(
    arch: str,
    mid_step: bool,
    request: pytest.FixtureRequest,
    references: dict[str, list[list[int]]],
) -> None:
    model_dir = request.getfixturevalue(f"{arch}_dir")
    config = EngineConfig(
        model=str(model_dir), block_size=4, num_blocks=40, max_num_batched_tokens=16
    )
    engine = EngineCore(config)
    schedules = record_schedules(engine)
    check_against_reference(engine, references[arch], mid_step)
    assert engine.stats().num_preemptions > 0, "the cache was meant to run out"
    chunked = [
        s for out in schedules for s in out.scheduled if s.num_new_tokens > 1 and not s.samples
    ]
    assert chunked, "a prompt longer than the token budget was meant to be chunked"
    mixed = [out for out in schedules if len({s.num_new_tokens > 1 for s in out.scheduled}) == 2]
    assert mixed, "some step was meant to mix a prefill chunk with decodes"


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_greedy_matches_transformers_on_each_cpu_attention_backend(
    backend: str, llama_dir: Path, references: dict[str, list[list[int]]]
) -> None:
    # auto picks native where it is built: torch, the fallback, must stay exact too.
    if backend == "native":
        try:
            native.load()
        except native.NativeUnavailable as e:
            if native.cpu_isa() is None or shutil.which("c++") is None:
                pytest.skip(f"the native op cannot be built here: {e}")
            raise
    config = EngineConfig(
        model=str(llama_dir),
        attention_backend=backend,
        block_size=4,
        num_blocks=40,
        max_num_batched_tokens=16,
    )
    engine = EngineCore(config)
    assert engine.runner.backend.name == backend
    check_against_reference(engine, references["llama"], mid_step=False)


def test_prefix_cache_hit_reuses_blocks_and_keeps_tokens(llama_dir: Path) -> None:
    rng = random.Random(7)
    shared = [rng.randrange(VOCAB_SIZE) for _ in range(40)]
    first = [*shared, 1, 2, 3]
    second = [*shared, 9, 8]
    reference = hf_greedy(llama_dir, [first, second], 8)
    engine = EngineCore(EngineConfig(model=str(llama_dir), num_blocks=64, block_size=8))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    results = run_staggered(engine, [first, second], [params, params], [0, 20])
    assert results["req-0"].token_ids == reference[0]
    assert results["req-1"].token_ids == reference[1]
    # 40 shared tokens = 5 full blocks of 8 computed by the first request.
    assert results["req-1"].outputs[-1].num_cached_tokens == 40
    assert engine.stats().prefix_cache_hit_rate > 0


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_16(llama_dir: Path) -> None:
    prompts = make_prompts(3)[:16]
    sampled = SamplingParams(
        max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True
    )
    alone = EngineCore(EngineConfig(model=str(llama_dir), num_blocks=128))
    solo = run_staggered(alone, [prompts[5]], [sampled], [0])["req-0"].token_ids

    batch = EngineCore(EngineConfig(model=str(llama_dir), num_blocks=256))
    params = [
        SamplingParams(max_tokens=6 + i, temperature=1.0, seed=i, ignore_eos=True)
        for i in range(16)
    ]
    params[5] = sampled
    together = run_staggered(batch, prompts, params, [i % 3 for i in range(16)])
    assert together["req-5"].token_ids == solo
    # Other seeds give other tokens, so the seed really decides the draw.
    other = SamplingParams(
        max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=99, ignore_eos=True
    )
    third = EngineCore(EngineConfig(model=str(llama_dir), num_blocks=128))
    assert run_staggered(third, [prompts[5]], [other], [0])["req-0"].token_ids != solo
