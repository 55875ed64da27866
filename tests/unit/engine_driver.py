"""Drive an EngineCore step by step, with requests arriving at chosen steps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from twolane.scheduler.engine import EngineCore
from twolane.scheduler.protocol import AddRequest, TokenOutput
from twolane.scheduler.request import FinishReason, Priority, SamplingParams
from twolane.scheduler.scheduler import SchedulerOutput


@dataclass
class Collected:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    outputs: list[TokenOutput] = field(default_factory=list)


def add(
    engine: EngineCore,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams | None = None,
    priority: Priority = Priority.INTERACTIVE,
    deadline_s: float | None = None,
    stream: bool = True,
    tenant: str = "default",
) -> TokenOutput | None:
    """Queue a request; returns the refusal, if the engine refused it."""
    return engine.add_request(
        AddRequest(
            request_id,
            prompt_token_ids,
            params or SamplingParams(),
            priority,
            arrival_time_s=time.monotonic(),
            deadline_s=deadline_s,
            stream=stream,
            tenant=tenant,
        )
    )


def collect(results: dict[str, Collected], outputs: list[TokenOutput]) -> None:
    for out in outputs:
        got = results.setdefault(out.request_id, Collected())
        assert got.finish_reason is None, f"{out.request_id} produced output after finishing"
        got.token_ids.extend(out.new_token_ids)
        got.logprobs.extend(out.new_logprobs)
        got.outputs.append(out)
        if out.finished:
            got.finish_reason = out.finish_reason


def drain(engine: EngineCore, max_steps: int = 10_000) -> dict[str, Collected]:
    """Step until nothing is left; every request's outputs."""
    results: dict[str, Collected] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return results
        collect(results, engine.step())
    raise AssertionError("engine did not finish")


class _Arrivals:
    """A layer hook that adds the requests due before the next step, mid-step."""

    def __init__(self, arrive: object, results: dict[str, Collected], engine: EngineCore) -> None:
        self._arrive = arrive
        self._results = results
        self._engine = engine

    def safe_point(self) -> None:
        self._arrive()  # type: ignore[operator]
        collect(self._results, self._engine.urgent_step())


def run_staggered(
    engine: EngineCore,
    prompts: list[list[int]],
    params: list[SamplingParams],
    arrival_steps: list[int],
    max_steps: int = 10_000,
    mid_step: bool = False,
    priorities: list[Priority] | None = None,
) -> dict[str, Collected]:
    """Add prompt i just before step `arrival_steps[i]`; step until all finish.

    With `mid_step`, a prompt due before step n > 0 arrives during step n - 1 instead,
    between its first two layers, and may start in an urgent step there: how the engine
    core process serves a request that arrives while a step is in flight. Requests are
    interactive unless `priorities` says otherwise.
    """
    results: dict[str, Collected] = {}
    pending = sorted(range(len(prompts)), key=lambda i: arrival_steps[i])
    step = 0

    def arrive(until_step: int) -> None:
        while pending and arrival_steps[pending[0]] <= until_step:
            i = pending.pop(0)
            priority = priorities[i] if priorities else Priority.INTERACTIVE
            refused = add(engine, f"req-{i}", prompts[i], params[i], priority)
            assert refused is None, refused

    hook = _Arrivals(lambda: arrive(step + 1), results, engine)
    while pending or engine.has_unfinished:
        arrive(step)
        collect(results, engine.step(hook if mid_step else None))
        step += 1
        assert step < max_steps, "engine did not finish"
    return results


def record_schedules(engine: EngineCore, urgent: bool = False) -> list[SchedulerOutput]:
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
