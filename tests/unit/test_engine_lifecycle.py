"""Every way a request ends returns its blocks; stop conditions, deadlines, priorities."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from engine_driver import Collected, add, collect, drain, run_staggered

from twolane.models.builtin import builtin_model_dir
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import ErrorCode, FinishReason, Priority, SamplingParams


@pytest.fixture(scope="module")
def engine() -> EngineCore:
    return EngineCore(EngineConfig(model="builtin", num_blocks=64, block_size=8))


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


def tokens(text: str) -> list[int]:
    """The built-in model's byte-level token ids of `text`."""
    return list(text.encode())


def assert_no_blocks_held(engine: EngineCore) -> None:
    assert engine.block_manager.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    engine.block_manager.check_invariants()


def test_abort_mid_generation_returns_every_block(engine: EngineCore) -> None:
    add(engine, "keep", tokens("a" * 30), greedy(20))
    add(engine, "drop", tokens("b" * 30), greedy(20))
    for _ in range(3):
        engine.step()
    used_before = engine.block_manager.num_used_blocks
    final = engine.abort("drop")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert engine.block_manager.num_used_blocks < used_before
    results = drain(engine)
    assert results["keep"].finish_reason is FinishReason.LENGTH
    assert engine.abort("drop") is None
    assert_no_blocks_held(engine)


def test_abort_while_waiting_returns_nothing_to_do(engine: EngineCore) -> None:
    add(engine, "waiting", tokens("xyz"), greedy(5))
    final = engine.abort("waiting")
    assert final is not None and final.new_token_ids == []
    assert not engine.has_unfinished
    assert_no_blocks_held(engine)


def test_expired_request_is_dropped_before_it_costs_a_step(engine: EngineCore) -> None:
    steps_before = engine.num_steps
    add(engine, "late", tokens("hello"), greedy(5), deadline_s=time.monotonic() - 1)
    results = drain(engine)
    assert results["late"].finish_reason is FinishReason.DEADLINE
    assert results["late"].token_ids == []
    assert engine.num_steps == steps_before
    assert_no_blocks_held(engine)


def test_deadline_mid_generation_finishes_with_deadline_reason(engine: EngineCore) -> None:
    add(engine, "slow", tokens("hello"), greedy(50))
    seq = engine._requests["slow"].seq
    results: dict[str, Collected] = {}
    for _ in range(3):
        collect(results, engine.step())
    seq.deadline_s = time.monotonic()
    while engine.has_unfinished:
        collect(results, engine.step())
    assert results["slow"].finish_reason is FinishReason.DEADLINE
    assert 0 < len(results["slow"].token_ids) < 50
    assert_no_blocks_held(engine)


def test_preempted_requests_resume_and_release_their_blocks() -> None:
    engine = EngineCore(EngineConfig(model="builtin", num_blocks=12, block_size=4))
    prompts = [list(range(10 + i, 20 + i)) for i in range(4)]
    reference = EngineCore(EngineConfig(model="builtin", num_blocks=256)).generate(
        prompts, greedy(16)
    )
    results = run_staggered(engine, prompts, [greedy(16)] * 4, [0, 0, 1, 2])
    assert engine.stats().num_preemptions > 0
    assert [results[f"req-{i}"].token_ids for i in range(4)] == reference
    assert_no_blocks_held(engine)


def test_interactive_goes_before_batch_and_fcfs_within_a_class() -> None:
    engine = EngineCore(EngineConfig(model="builtin", num_blocks=64, max_num_seqs=1))
    for name, prio in [
        ("bulk", Priority.BULK),
        ("std1", Priority.STANDARD),
        ("urgent", Priority.URGENT),
        ("std2", Priority.STANDARD),
        ("chat", Priority.INTERACTIVE),
    ]:
        add(engine, name, tokens("hi"), greedy(2), prio)
    order: list[str] = []
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
    assert order == ["chat", "urgent", "std1", "std2", "bulk"]


def test_lowest_class_newest_sequence_is_the_preemption_victim() -> None:
    engine = EngineCore(EngineConfig(model="builtin", num_blocks=8, block_size=4))
    add(engine, "std-old", [1] * 7, greedy(20), priority=Priority.STANDARD)
    add(engine, "bulk-old", [2] * 7, greedy(20), priority=Priority.BULK)
    add(engine, "bulk-new", [3] * 7, greedy(20), priority=Priority.BULK)
    add(engine, "chat", [4] * 7, greedy(20))
    preempted: list[str] = []
    while not preempted:
        out = engine.scheduler.schedule(time.monotonic())
        preempted = [s.request_id for s in out.preempted]
        for item in out.scheduled:
            samples = item.samples
            item.seq.num_computed_tokens += item.num_new_tokens
            if samples:
                item.seq.token_ids.append(5)
    assert preempted[0] == "bulk-new"


def test_stop_token_id_stops_after_that_token(engine: EngineCore) -> None:
    add(engine, "free", tokens("The dog"), greedy(12))
    free = drain(engine)["free"].token_ids
    add(engine, "stopped", tokens("The dog"), greedy(12, stop_token_ids=(free[4],)))
    got = drain(engine)["stopped"]
    assert got.finish_reason is FinishReason.STOP
    assert got.token_ids == free[: free.index(free[4]) + 1]


def test_eos_stops_generation(tmp_path: Path) -> None:
    # A copy of the built-in model whose EOS is a token greedy decoding emits.
    probe = EngineCore(EngineConfig(model="builtin", num_blocks=32))
    free = probe.generate([[72, 105]], greedy(10))[0]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(builtin_model_dir(), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = free[3]
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = EngineCore(EngineConfig(model=str(model_dir), num_blocks=32))
    add(engine, "eos", [72, 105], SamplingParams(max_tokens=10))
    got = drain(engine)["eos"]
    assert got.finish_reason is FinishReason.STOP
    assert got.token_ids == free[: free.index(free[3]) + 1]


def test_max_tokens_finishes_with_length(engine: EngineCore) -> None:
    add(engine, "short", tokens("abc"), greedy(3))
    got = drain(engine)["short"]
    assert got.finish_reason is FinishReason.LENGTH
    assert len(got.token_ids) == 3
    assert got.outputs[-1].num_output_tokens == 3
    assert got.outputs[-1].num_prompt_tokens == 3


def test_logprobs_are_the_log_softmax_of_the_model_logits(engine: EngineCore) -> None:
    from transformers import AutoModelForCausalLM

    prompt = [10, 20, 30, 40]
    add(engine, "lp", prompt, greedy(5, logprobs=True))
    got = drain(engine)["lp"]
    hf = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + got.token_ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    expected = expected.gather(1, torch.tensor(got.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got.logprobs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("prompt", "params", "problem"),
    [
        ([], SamplingParams(), "no tokens"),
        ([1, 10_000], SamplingParams(), "outside the vocabulary"),
        ([1] * 5000, SamplingParams(), "context length"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
    ],
)
def test_a_request_the_core_cannot_run_is_refused_without_harm(
    engine: EngineCore, prompt: list[int], params: SamplingParams, problem: str
) -> None:
    """The frontend's validator keeps such requests away; the core still never breaks on one."""
    refused = add(engine, "bad", prompt, params)
    assert refused is not None and refused.finish_reason is FinishReason.ERROR
    assert refused.error_code is ErrorCode.REJECTED and problem in (refused.error or "")
    assert not engine.has_unfinished
    assert_no_blocks_held(engine)


def test_a_full_interactive_queue_refuses_with_queue_full() -> None:
    engine = EngineCore(EngineConfig(model="builtin", num_blocks=64, max_waiting_interactive=2))
    assert add(engine, "a", [1, 2]) is None
    assert add(engine, "b", [1, 2]) is None
    refused = add(engine, "c", [1, 2])
    assert refused is not None and refused.error_code is ErrorCode.QUEUE_FULL
    assert add(engine, "job", [1, 2], priority=Priority.BULK) is None  # batch work still queues
    drain(engine)
    assert add(engine, "d", [1, 2]) is None


def test_bfloat16_runs_on_cpu() -> None:
    engine = EngineCore(EngineConfig(model="builtin", dtype="bfloat16", num_blocks=32))
    fp32 = EngineCore(EngineConfig(model="builtin", num_blocks=32))
    prompt = [[ord(c) for c in "Hello there"]]
    out = engine.generate(prompt, greedy(6))[0]
    assert len(out) == 6
    assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    # Wide logit gaps in the built-in model keep the first greedy token stable across dtypes.
    assert out[0] == fp32.generate(prompt, greedy(1))[0][0]
