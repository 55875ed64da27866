"""Drive an LLMEngine step by step, with requests arriving at chosen steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from twolane.scheduler.engine import LLMEngine
from twolane.scheduler.request import FinishReason, RequestOutput, SamplingParams
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
) -> dict[str, Collected]:
    """Add prompt i just before step `arrival_steps[i]`; step until all finish."""
    results: dict[str, Collected] = {}
    pending = sorted(range(len(prompts)), key=lambda i: arrival_steps[i])
    step = 0
    while pending or engine.has_unfinished:
        while pending and arrival_steps[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(f"req-{i}", prompt_token_ids=prompts[i], params=params[i])
        collect(results, engine.step())
        step += 1
        assert step < max_steps, "engine did not finish"
    return results


def record_schedules(engine: LLMEngine) -> list[SchedulerOutput]:
    """Keep every SchedulerOutput the engine produces from now on."""
    seen: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recording(now_s: float) -> SchedulerOutput:
        out = schedule(now_s)
        seen.append(out)
        return out

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    return seen
