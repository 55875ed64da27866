"""Drive an LLMEngine step by step, with requests arriving at chosen steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from twolane.scheduler.engine import LLMEngine
from twolane.scheduler.request import FinishReason, Priority, RequestOutput, SamplingParams
from twolane.scheduler.scheduler import SchedulerOutput


@dataclass
class Collected:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    outputs: list[RequestOutput] = field(default_factory=list)


def collect(results: dict[str, Collected], outputs: list[RequestOutput]) -> None:
    for out in outputs:
        got = results.setdefault(out.request_id, Collected())
        assert got.finish_reason is None, f"{out.request_id} produced output after finishing"
        got.token_ids.extend(out.new_token_ids)
        got.text += out.new_text
        got.logprobs.extend(out.new_logprobs)
        got.outputs.append(out)
        if out.finished:
            got.finish_reason = out.finish_reason


def run_staggered(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    arrival_steps: list[int],
    max_steps: int = 10_000,
    mid_step: bool = False,
    priorities: list[Priority] | None = None,
) -> dict[str, Collected]:
    """Add prompt i just before step `arrival_steps[i]`; step until all finish.

    With `mid_step`, a prompt due before step n > 0 arrives during step n - 1 instead,
    between its first two layers, and may start in an urgent step there: how
    `AsyncEngine` serves a request that arrives while a step is in flight. Requests are
    interactive unless `priorities` says otherwise.
    """
    results: dict[str, Collected] = {}
    pending = sorted(range(len(prompts)), key=lambda i: arrival_steps[i])
    step = 0

    def arrive(until_step: int) -> None:
        while pending and arrival_steps[pending[0]] <= until_step:
            i = pending.pop(0)
            priority = priorities[i] if priorities else Priority.INTERACTIVE
            engine.add_request(
                f"req-{i}", prompt_token_ids=prompts[i], params=params[i], priority=priority
            )

    def between_layers() -> None:
        arrive(step + 1)
        collect(results, engine.urgent_step())

    while pending or engine.has_unfinished:
        arrive(step)
        collect(results, engine.step(between_layers if mid_step else None))
        step += 1
        assert step < max_steps, "engine did not finish"
    return results


def record_schedules(engine: LLMEngine, urgent: bool = False) -> list[SchedulerOutput]:
    """Keep every SchedulerOutput the engine produces from now on (of its urgent steps
    only, with `urgent`)."""
    seen: list[SchedulerOutput] = []
    name = "schedule_urgent" if urgent else "schedule"
    schedule = getattr(engine.scheduler, name)

    def recording(*args: float) -> SchedulerOutput:
        out = schedule(*args)
        seen.append(out)
        return out

    setattr(engine.scheduler, name, recording)
    return seen
