"""A step that raises fails only the request that causes it.

Faults are injected into the real model and sampler of a real engine, for one request:
a forward pre-hook on a middle decoder layer raises when the step carries a poison
token (after the layers before it wrote their KV), or multinomial raises for one
request's generator (after the rows before it drew). The innocent requests in those
steps, greedy and seeded sampling alike, produce the tokens of a run without the fault.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import structlog
import torch

from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.protocol import AddRequest, TokenOutput
from twolane.scheduler.request import ErrorCode, FinishReason, Priority, SamplingParams

NUM_INNOCENT = 15
MAX_TOKENS = 24
CULPRIT = "culprit"
CULPRIT_ARRIVES_AT_STEP = 3  # mid-run: the innocents are decoding by then


def engine() -> EngineCore:
    return EngineCore(EngineConfig(model="builtin", num_blocks=512, block_size=8))


def innocent_requests() -> dict[str, tuple[list[int], SamplingParams]]:
    """Greedy and seeded sampling requests of different lengths."""
    requests = {}
    for i in range(NUM_INNOCENT):
        prompt = list(f"innocent request {i}: ".encode() * (1 + i % 4))
        if i % 2:
            params = SamplingParams(
                max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, seed=1000 + i, ignore_eos=True
            )
        else:
            params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        requests[f"innocent-{i}"] = (prompt, params)
    return requests


def add(core: EngineCore, request_id: str, prompt: list[int], params: SamplingParams) -> None:
    refused = core.add_request(
        AddRequest(request_id, prompt, params, Priority.INTERACTIVE, time.monotonic())
    )
    assert refused is None, refused


def run(
    core: EngineCore,
    requests: dict[str, tuple[list[int], SamplingParams]],
    late: dict[str, tuple[list[int], SamplingParams]] | None = None,
    on_added: Callable[[], None] | None = None,
) -> dict[str, list[TokenOutput]]:
    """Run `requests` from the first step and `late` from CULPRIT_ARRIVES_AT_STEP on;
    every request's outputs. The block manager's bookkeeping is checked after every step."""
    outputs: dict[str, list[TokenOutput]] = {}
    for request_id, (prompt, params) in requests.items():
        add(core, request_id, prompt, params)
    for step in range(10_000):
        if step == CULPRIT_ARRIVES_AT_STEP:
            for request_id, (prompt, params) in (late or {}).items():
                add(core, request_id, prompt, params)
            if on_added is not None:
                on_added()
        if step > CULPRIT_ARRIVES_AT_STEP and not core.has_unfinished:
            break
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        core.block_manager.check_invariants()
    assert core.block_manager.num_used_blocks == 0, "a request kept KV blocks"
    return outputs


def tokens(outputs: list[TokenOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


@pytest.fixture(scope="module")
def clean() -> dict[str, list[int]]:
    """Every innocent request's tokens in a run without any fault."""
    outputs = run(engine(), innocent_requests())
    return {request_id: tokens(outs) for request_id, outs in outputs.items()}


def assert_only_the_culprit_failed(
    outputs: dict[str, list[TokenOutput]], clean: dict[str, list[int]]
) -> None:
    final = outputs[CULPRIT][-1]
    assert final.finish_reason is FinishReason.ERROR
    assert final.error_code is ErrorCode.ENGINE_FAILED
    for request_id, expected in clean.items():
        assert outputs[request_id][-1].finish_reason is FinishReason.LENGTH, request_id
        assert tokens(outputs[request_id]) == expected, request_id


class LayerFault:
    """Makes decoder layer `layer_index` raise in every forward pass over `poison`."""

    def __init__(self, core: EngineCore, poison: int, layer_index: int) -> None:
        model = core.runner.model
        self.poison = poison
        self.num_raised = 0
        self._carries_poison = False
        self._handles = [
            model.embed_tokens.register_forward_pre_hook(self._look),
            model.layers[layer_index].register_forward_pre_hook(self._raise),
        ]

    def _look(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._carries_poison = bool((args[0] == self.poison).any())

    def _raise(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self._carries_poison:
            self.num_raised += 1
            raise RuntimeError("fault injected into a decoder layer")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def unused_token(clean: dict[str, list[int]], vocab_size: int) -> int:
    """A token no innocent request reads or writes, so only the culprit carries it."""
    seen = {t for prompt, _ in innocent_requests().values() for t in prompt}
    seen |= {t for ts in clean.values() for t in ts}
    free = [t for t in range(vocab_size) if t not in seen]
    assert free, "every token of the vocabulary is in use"
    return free[0]


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, object]]]:
    with structlog.testing.capture_logs() as logs:
        yield logs


def test_a_fault_in_the_forward_pass_fails_only_its_request(
    clean: dict[str, list[int]], captured_logs: list[dict[str, object]]
) -> None:
    core = engine()
    poison = unused_token(clean, core.vocab_size)
    fault = LayerFault(core, poison, layer_index=2)
    culprit = {CULPRIT: ([72, 105, poison, 33], SamplingParams(max_tokens=MAX_TOKENS))}
    try:
        outputs = run(core, innocent_requests(), late=culprit)
    finally:
        fault.remove()
    assert_only_the_culprit_failed(outputs, clean)
    # The step raised with the culprit among 16 sequences, then in the halves holding it.
    assert fault.num_raised > 1
    failures = [e for e in captured_logs if e["event"] == "step failed"]
    assert len(failures) == 1, "one log entry per failed step"
    assert failures[0]["failed_request_ids"] == [CULPRIT]
    assert failures[0]["num_seqs"] == NUM_INNOCENT + 1


def test_a_fault_after_other_rows_drew_their_samples_loses_no_draw(
    clean: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The culprit samples too; multinomial raises on its row, after the rows before it
    took their draws from their generators. Those draws are put back for the rerun."""
    core = engine()
    culprit_params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=7, ignore_eos=True)
    culprit = {CULPRIT: (list(b"a sampling culprit"), culprit_params)}
    culprit_generator: list[torch.Generator] = []
    multinomial = torch.multinomial
    num_draws = {"culprit": 0}

    def failing_multinomial(probs: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if culprit_generator and kwargs.get("generator") is culprit_generator[0]:
            num_draws["culprit"] += 1
            if num_draws["culprit"] > 2:  # a few tokens in, mid-run
                raise RuntimeError("fault injected into sampling")
        return multinomial(probs, *args, **kwargs)

    def remember_generator() -> None:
        generator = core._requests[CULPRIT].seq.generator
        assert generator is not None
        culprit_generator.append(generator)

    monkeypatch.setattr(torch, "multinomial", failing_multinomial)
    outputs = run(core, innocent_requests(), late=culprit, on_added=remember_generator)
    assert_only_the_culprit_failed(outputs, clean)
    assert 0 < len(tokens(outputs[CULPRIT])) < MAX_TOKENS


def test_a_fault_that_does_not_come_back_fails_nobody(clean: dict[str, list[int]]) -> None:
    core = engine()
    layer = core.runner.model.layers[1]
    faults = {"left": 1}

    def raise_once(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if core.num_steps == CULPRIT_ARRIVES_AT_STEP and faults["left"]:
            faults["left"] -= 1
            raise RuntimeError("a passing fault")

    handle = layer.register_forward_pre_hook(raise_once)
    try:
        outputs = run(core, innocent_requests())
    finally:
        handle.remove()
    assert faults["left"] == 0
    assert {request_id: tokens(outs) for request_id, outs in outputs.items()} == clean


def test_the_engine_serves_on_after_every_sequence_of_a_step_failed(
    clean: dict[str, list[int]],
) -> None:
    core = engine()

    def always_raise(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        raise RuntimeError("a broken model")

    handle = core.runner.model.layers[0].register_forward_pre_hook(always_raise)
    requests = innocent_requests()
    try:
        broken = run(core, requests)
    finally:
        handle.remove()
    assert {outs[-1].error_code for outs in broken.values()} == {ErrorCode.ENGINE_FAILED}
    after = run(core, requests)
    assert {request_id: tokens(outs) for request_id, outs in after.items()} == clean
