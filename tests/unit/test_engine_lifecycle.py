"""Every way a request ends returns its blocks; stop conditions, deadlines, priorities."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from engine_driver import Collected, collect, run_staggered

from twolane.models.builtin import builtin_model_dir
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import LLMEngine
from twolane.scheduler.errors import InvalidRequestError
from twolane.scheduler.request import FinishReason, Priority, SamplingParams


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="builtin", num_blocks=64, block_size=8))


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


def drain(engine: LLMEngine) -> dict[str, Collected]:
    results: dict[str, Collected] = {}
    while engine.has_unfinished:
        collect(results, engine.step())
    return results


def assert_no_blocks_held(engine: LLMEngine) -> None:
    assert engine.block_manager.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    engine.block_manager.check_invariants()


def test_abort_mid_generation_returns_every_block(engine: LLMEngine) -> None:
    engine.add_request("keep", prompt="a" * 30, params=greedy(20))
    engine.add_request("drop", prompt="b" * 30, params=greedy(20))
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


def test_abort_while_waiting_returns_nothing_to_do(engine: LLMEngine) -> None:
    engine.add_request("waiting", prompt="xyz", params=greedy(5))
    final = engine.abort("waiting")
    assert final is not None and final.new_token_ids == []
    assert not engine.has_unfinished
    assert_no_blocks_held(engine)


def test_expired_request_is_dropped_before_it_costs_a_step(engine: LLMEngine) -> None:
    steps_before = engine.num_steps
    engine.add_request("late", prompt="hello", params=greedy(5), deadline_s=time.monotonic() - 1)
    results = drain(engine)
    assert results["late"].finish_reason is FinishReason.DEADLINE
    assert results["late"].token_ids == []
    assert engine.num_steps == steps_before
    assert_no_blocks_held(engine)


def test_deadline_mid_generation_finishes_with_deadline_reason(engine: LLMEngine) -> None:
    seq = engine.add_request("slow", prompt="hello", params=greedy(50))
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
    engine = LLMEngine(EngineConfig(model="builtin", num_blocks=12, block_size=4))
    prompts = [list(range(10 + i, 20 + i)) for i in range(4)]
    reference = LLMEngine(EngineConfig(model="builtin", num_blocks=256)).generate(
        prompts, greedy(16)
    )
    results = run_staggered(engine, prompts, [greedy(16)] * 4, [0, 0, 1, 2])
    assert engine.stats().num_preemptions > 0
    assert [results[f"req-{i}"].token_ids for i in range(4)] == reference
    assert_no_blocks_held(engine)


def test_interactive_goes_before_batch_and_fcfs_within_a_class() -> None:
    engine = LLMEngine(EngineConfig(model="builtin", num_blocks=64, max_num_seqs=1))
    for name, prio in [
        ("bulk", Priority.BULK),
        ("std1", Priority.STANDARD),
        ("urgent", Priority.URGENT),
        ("std2", Priority.STANDARD),
        ("chat", Priority.INTERACTIVE),
    ]:
        engine.add_request(name, prompt="hi", params=greedy(2), priority=prio)
    order: list[str] = []
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
    assert order == ["chat", "urgent", "std1", "std2", "bulk"]


def test_lowest_class_newest_sequence_is_the_preemption_victim() -> None:
    engine = LLMEngine(EngineConfig(model="builtin", num_blocks=8, block_size=4))
    engine.add_request(
        "std-old", prompt_token_ids=[1] * 7, params=greedy(20), priority=Priority.STANDARD
    )
    engine.add_request(
        "bulk-old", prompt_token_ids=[2] * 7, params=greedy(20), priority=Priority.BULK
    )
    engine.add_request(
        "bulk-new", prompt_token_ids=[3] * 7, params=greedy(20), priority=Priority.BULK
    )
    engine.add_request("chat", prompt_token_ids=[4] * 7, params=greedy(20))
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


def test_stop_string_cuts_the_text_and_stops(engine: LLMEngine) -> None:
    engine.add_request("free", prompt="The cat", params=greedy(24))
    text = drain(engine)["free"].text
    stop = text[8:11]
    assert len(stop) == 3 and stop not in text[:8]
    engine.add_request("stopped", prompt="The cat", params=greedy(24, stop=(stop,)))
    got = drain(engine)["stopped"]
    assert got.finish_reason is FinishReason.STOP
    assert got.text == text[: text.index(stop)]
    assert_no_blocks_held(engine)


def test_stop_token_id_stops_after_that_token(engine: LLMEngine) -> None:
    engine.add_request("free", prompt="The dog", params=greedy(12))
    tokens = drain(engine)["free"].token_ids
    engine.add_request("stopped", prompt="The dog", params=greedy(12, stop_token_ids=(tokens[4],)))
    got = drain(engine)["stopped"]
    assert got.finish_reason is FinishReason.STOP
    assert got.token_ids == tokens[: tokens.index(tokens[4]) + 1]


def test_eos_stops_generation(tmp_path: Path) -> None:
    # A copy of the built-in model whose EOS is a token greedy decoding emits.
    probe = LLMEngine(EngineConfig(model="builtin", num_blocks=32))
    tokens = probe.generate([[72, 105]], greedy(10))[0]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(builtin_model_dir(), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = tokens[3]
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_blocks=32))
    engine.add_request("eos", prompt_token_ids=[72, 105], params=SamplingParams(max_tokens=10))
    got = drain(engine)["eos"]
    assert got.finish_reason is FinishReason.STOP
    assert got.token_ids == tokens[: tokens.index(tokens[3]) + 1]


def test_max_tokens_finishes_with_length(engine: LLMEngine) -> None:
    engine.add_request("short", prompt="abc", params=greedy(3))
    got = drain(engine)["short"]
    assert got.finish_reason is FinishReason.LENGTH
    assert len(got.token_ids) == 3
    assert got.outputs[-1].num_output_tokens == 3
    assert got.outputs[-1].num_prompt_tokens == 3


def test_logprobs_are_the_log_softmax_of_the_model_logits(engine: LLMEngine) -> None:
    from transformers import AutoModelForCausalLM

    prompt = [10, 20, 30, 40]
    engine.add_request("lp", prompt_token_ids=prompt, params=greedy(5, logprobs=True))
    got = drain(engine)["lp"]
    hf = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + got.token_ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    expected = expected.gather(1, torch.tensor(got.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_streamed_text_never_splits_a_multibyte_character(engine: LLMEngine) -> None:
    # Byte-level tokens: each character of "é✓" spans several tokens.
    engine.add_request("utf8", prompt="x", params=greedy(12))
    pieces = [o.new_text for o in drain(engine)["utf8"].outputs]
    for piece in pieces:
        piece.encode("utf-8")  # a lone surrogate or split character would not round-trip
        assert "\ufffd" not in piece or piece is pieces[-1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a", "prompt_token_ids": [1]}, "prompt"),
        ({"prompt_token_ids": [1, 10_000]}, "prompt_token_ids"),
        ({"prompt_token_ids": [1] * 5000}, "prompt"),
        (
            {"prompt": "a", "params": SamplingParams(max_tokens=100_000)},
            "sampling_params.max_tokens",
        ),
    ],
)
def test_invalid_requests_name_the_field(engine: LLMEngine, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", **kwargs)
    assert err.value.field == field
    assert not engine.has_unfinished


def test_bfloat16_runs_on_cpu() -> None:
    engine = LLMEngine(EngineConfig(model="builtin", dtype="bfloat16", num_blocks=32))
    fp32 = LLMEngine(EngineConfig(model="builtin", num_blocks=32))
    prompt = [[ord(c) for c in "Hello there"]]
    out = engine.generate(prompt, greedy(6))[0]
    assert len(out) == 6
    assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    # Wide logit gaps in the built-in model keep the first greedy token stable across dtypes.
    assert out[0] == fp32.generate(prompt, greedy(1))[0][0]
