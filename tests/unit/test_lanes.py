"""Two lanes on one engine: interactive work is never queued behind batch work."""

from __future__ import annotations

from collections.abc import Callable

from engine_driver import add, collect, record_schedules

from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import FinishReason, Priority, SamplingParams

BATCH_PARAMS = SamplingParams(max_tokens=40, ignore_eos=True)


def fill_with_batch(engine: EngineCore, num_seqs: int, prompt_len: int = 20) -> None:
    for i in range(num_seqs):
        add(
            engine,
            f"job-{i}",
            [(7 * i + j) % 250 for j in range(prompt_len)],
            BATCH_PARAMS,
            (Priority.URGENT, Priority.STANDARD, Priority.BULK)[i % 3],
        )
    for _ in range(3):
        engine.step()


def add_interactive(engine: EngineCore) -> None:
    add(engine, "chat", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4))


def engine_with_a_full_cache() -> EngineCore:
    config = EngineConfig(
        model="builtin",
        num_blocks=12,
        block_size=8,
        reserved_block_fraction=0.0,
        max_batch_share=1.0,
    )
    engine = EngineCore(config)
    fill_with_batch(engine, 4, prompt_len=22)  # 3 blocks each: the cache is full
    return engine


def scheduled_ids(engine: EngineCore) -> set[str]:
    schedules = record_schedules(engine)
    engine.step()
    return {s.seq.request_id for s in schedules[-1].scheduled}


def test_interactive_takes_a_slot_from_batch_in_the_next_step() -> None:
    config = EngineConfig(model="builtin", num_blocks=256, max_num_seqs=4, max_batch_share=1.0)
    engine = EngineCore(config)
    fill_with_batch(engine, 6)
    assert len(engine.scheduler.running) == 4
    add_interactive(engine)
    assert "chat" in scheduled_ids(engine)
    assert engine.stats().num_preemptions == 1
    # Running were urgent job-0, job-3 and standard job-1, job-4: the victim is the
    # lowest class, newest of them.
    preempted = [s.request_id for s in engine.scheduler.waiting if s.num_preemptions]
    assert preempted == ["job-4"]


def test_interactive_takes_blocks_from_batch_in_the_next_step() -> None:
    engine = engine_with_a_full_cache()
    assert engine.block_manager.num_free_blocks == 0
    add_interactive(engine)
    assert "chat" in scheduled_ids(engine)
    assert engine.stats().num_preemptions >= 1


def test_interactive_takes_token_budget_from_batch_prefill_in_the_next_step() -> None:
    config = EngineConfig(model="builtin", num_blocks=256, max_num_batched_tokens=32)
    engine = EngineCore(config)
    # Long batch prompts keep every step's budget busy with prefill chunks.
    for i in range(3):
        add(engine, f"job-{i}", [i + 1] * 200, BATCH_PARAMS, Priority.BULK)
    engine.step()
    add_interactive(engine)
    schedules = record_schedules(engine)
    engine.step()
    chat = [s for s in schedules[-1].scheduled if s.seq.request_id == "chat"]
    assert chat and chat[0].num_new_tokens == 5


def test_batch_work_leaves_the_block_reserve_free() -> None:
    config = EngineConfig(
        model="builtin", num_blocks=20, block_size=8, reserved_block_fraction=0.25
    )
    engine = EngineCore(config)
    fill_with_batch(engine, 10, prompt_len=15)
    # 25% of 20 blocks stays free while batch prompts are admitted.
    assert engine.block_manager.num_free_blocks >= 5 - len(engine.scheduler.running)
    assert len(engine.scheduler.waiting) > 0


def test_preempted_batch_job_gives_the_same_greedy_output_and_reuses_its_prefix() -> None:
    prompt = [(3 * j) % 250 for j in range(40)]
    solo = EngineCore(EngineConfig(model="builtin", num_blocks=64, block_size=8))
    expected = solo.generate([prompt], BATCH_PARAMS)[0]

    config = EngineConfig(
        model="builtin", num_blocks=64, block_size=8, max_num_seqs=1, max_batch_share=1.0
    )
    engine = EngineCore(config)
    add(engine, "job", prompt, BATCH_PARAMS, Priority.STANDARD)
    results: dict = {}
    for _ in range(5):
        collect(results, engine.step())
    add_interactive(engine)
    while engine.has_unfinished:
        collect(results, engine.step())
    assert engine.stats().num_preemptions == 1
    assert results["chat"].finish_reason is FinishReason.LENGTH
    assert results["job"].token_ids == expected
    # On resume the prompt's full blocks came back from the prefix cache.
    assert results["job"].outputs[-1].num_cached_tokens >= 40
    assert engine.block_manager.num_used_blocks == 0


def test_preempted_batch_resumes_ahead_of_newer_batch_work() -> None:
    config = EngineConfig(model="builtin", num_blocks=64, max_num_seqs=1, max_batch_share=1.0)
    engine = EngineCore(config)
    add(engine, "old", [1] * 5, BATCH_PARAMS, Priority.STANDARD)
    engine.step()
    add(engine, "new", [2] * 5, BATCH_PARAMS, Priority.STANDARD)
    add_interactive(engine)
    engine.step()  # chat preempts "old"
    assert [s.request_id for s in engine.scheduler.waiting] == ["old", "new"]


def test_metrics_are_kept_per_lane() -> None:
    engine = EngineCore(EngineConfig(model="builtin", num_blocks=64, max_num_seqs=1))
    add(engine, "job", [1] * 5, BATCH_PARAMS, Priority.BULK)
    engine.step()
    add_interactive(engine)
    while engine.has_unfinished:
        engine.step()
    registry = engine.metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {**labels, "model_name": "builtin"})

    assert value("twolane_time_to_first_token_seconds_count", lane="interactive") == 1
    assert value("twolane_time_to_first_token_seconds_count", lane="batch") == 1
    assert value("twolane_preemptions_total", lane="batch") == 1
    assert value("twolane_output_tokens_total", lane="batch") == 40
    assert value("twolane_requests_finished_total", lane="interactive", reason="length") == 1
    assert value("twolane_time_per_output_token_seconds_count", lane="interactive") == 1
    stats = engine.stats()
    assert (stats.num_running_batch, stats.num_waiting_batch) == (0, 0)


def test_batch_allowance_shrinks_after_slow_interactive_steps_and_grows_back() -> None:
    config = EngineConfig(
        model="builtin", num_blocks=256, max_num_batched_tokens=256, interactive_ttft_target_s=0.1
    )
    engine = EngineCore(config)
    scheduler = engine.scheduler
    scheduler.observe_step(0.2, served_interactive=False)
    assert scheduler.batch_token_allowance == 256  # batch-only steps never cut it
    scheduler.observe_step(0.2, served_interactive=True)
    scheduler.observe_step(0.2, served_interactive=True)
    assert scheduler.batch_token_allowance == int(int(256 * 0.7) * 0.7)
    cut = scheduler.batch_token_allowance
    scheduler.observe_step(0.01, served_interactive=True)
    assert scheduler.batch_token_allowance > cut

    # With interactive work around, batch prefill is held to the allowance.
    add(engine, "job", [3] * 100, BATCH_PARAMS, Priority.BULK)
    add_interactive(engine)
    schedules = record_schedules(engine)
    engine.step()  # the interactive request's first token: a step of its own
    scheduler.batch_token_allowance = 8
    engine.step()
    first, second = schedules[-2:]
    assert [s.seq.request_id for s in first.scheduled] == ["chat"]
    batch_tokens = sum(s.num_new_tokens for s in second.scheduled if s.seq.priority.is_batch)
    assert batch_tokens == 8


def test_a_step_that_starts_interactive_requests_carries_no_batch_work() -> None:
    engine = EngineCore(EngineConfig(model="builtin", num_blocks=256))
    fill_with_batch(engine, 6)
    add_interactive(engine)
    schedules = record_schedules(engine)
    engine.step()
    engine.step()
    first, second = schedules[-2:]
    assert [s.seq.request_id for s in first.scheduled] == ["chat"]
    # Once it has its first token, batch decodes share the steps again.
    assert len(second.scheduled) == 7
    assert len(engine.scheduler.running) == 7  # nothing was preempted for it


class _ArriveOnce:
    """A layer hook: `arrive` adds requests between the first two layers, and they start
    in an urgent step there."""

    def __init__(self, engine: EngineCore, arrive: Callable[[], None]) -> None:
        self.engine, self.arrive = engine, arrive
        self.urgent_outputs: list[list[str]] = []

    def safe_point(self) -> None:
        if not self.urgent_outputs:
            self.arrive()
            self.urgent_outputs.append([out.request_id for out in self.engine.urgent_step()])


def step_with_arrival(engine: EngineCore, arrive: Callable[[], None]) -> list[list[str]]:
    """Run one step with requests arriving mid-step. Returns the ids with output, per
    urgent step and then the step."""
    hook = _ArriveOnce(engine, arrive)
    outputs = engine.step(hook)
    return [*hook.urgent_outputs, [out.request_id for out in outputs]]


def test_interactive_arriving_mid_step_gets_its_first_token_before_the_step_ends() -> None:
    engine = EngineCore(EngineConfig(model="builtin", num_blocks=256))
    fill_with_batch(engine, 6)
    urgent = record_schedules(engine, urgent=True)
    urgent_ids, step_ids = step_with_arrival(engine, lambda: add_interactive(engine))
    assert urgent_ids == ["chat"]
    assert [s.seq.request_id for s in urgent[0].scheduled] == ["chat"]
    assert "chat" not in step_ids and len(step_ids) == 6  # the batch decodes went on
    assert engine.stats().num_preemptions == 0
    labels = {"model_name": "builtin"}
    assert engine.metrics.registry.get_sample_value("twolane_urgent_starts_total", labels) == 1


def test_an_urgent_step_borrows_a_batch_slot_that_the_next_step_gives_back() -> None:
    config = EngineConfig(model="builtin", num_blocks=256, max_num_seqs=4, max_batch_share=1.0)
    engine = EngineCore(config)
    fill_with_batch(engine, 6)
    assert len(engine.scheduler.running) == 4
    urgent_ids, _ = step_with_arrival(engine, lambda: add_interactive(engine))
    assert urgent_ids == ["chat"]
    assert len(engine.scheduler.running) == 5  # the step in flight could not be cut short
    schedules = record_schedules(engine)
    engine.step()
    assert len(engine.scheduler.running) == 4
    assert [s.request_id for s in schedules[-1].preempted] == ["job-4"]
    assert "chat" in {s.seq.request_id for s in schedules[-1].scheduled}


def test_an_urgent_step_never_preempts_so_a_request_without_free_blocks_waits() -> None:
    engine = engine_with_a_full_cache()
    urgent = record_schedules(engine, urgent=True)
    regular = record_schedules(engine)
    urgent_ids, step_ids = step_with_arrival(engine, lambda: add_interactive(engine))
    assert urgent_ids == [] and not urgent[0].scheduled and not urgent[0].preempted
    # The step in flight finished whole.
    assert step_ids == [s.seq.request_id for s in regular[0].scheduled]
    # The next regular step makes room the usual way.
    assert "chat" in scheduled_ids(engine)
    assert engine.stats().num_preemptions >= 1
