"""Inside a priority class the engine takes turns across tenants: one tenant's backlog
does not push another tenant's request behind all of it."""

from __future__ import annotations

from engine_driver import add

from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import Priority, SamplingParams

PARAMS = SamplingParams(max_tokens=2, ignore_eos=True)


def finish_order(engine: EngineCore) -> list[str]:
    order: list[str] = []
    while engine.has_unfinished:
        order += [out.request_id for out in engine.step() if out.finished]
    return order


def one_at_a_time() -> EngineCore:
    config = EngineConfig(model="builtin", num_blocks=64, max_num_seqs=1, max_batch_share=1.0)
    return EngineCore(config)


def test_a_tenants_one_job_runs_among_the_first_despite_anothers_backlog() -> None:
    engine = one_at_a_time()
    for i in range(40):
        add(engine, f"a-{i}", [1, 2, 3], PARAMS, Priority.BULK, tenant="a")
    engine.step()  # a-0 starts
    add(engine, "b-0", [4, 5, 6], PARAMS, Priority.BULK, tenant="b")
    order = finish_order(engine)
    assert order.index("b-0") <= 2
    # The backlog itself still runs in its own order.
    assert [r for r in order if r.startswith("a-")] == [f"a-{i}" for i in range(40)]


def test_tenants_with_backlogs_take_turns() -> None:
    engine = one_at_a_time()
    for i in range(6):
        add(engine, f"a-{i}", [1, 2], PARAMS, Priority.STANDARD, tenant="a")
    for i in range(6):
        add(engine, f"b-{i}", [3, 4], PARAMS, Priority.STANDARD, tenant="b")
    order = finish_order(engine)
    assert [r[0] for r in order] == ["a", "b"] * 6


def test_one_tenant_alone_is_first_come_first_served_and_classes_still_rank() -> None:
    engine = one_at_a_time()
    add(engine, "bulk", [1, 2], PARAMS, Priority.BULK, tenant="a")
    for i in range(3):
        add(engine, f"std-{i}", [1, 2], PARAMS, Priority.STANDARD, tenant="a")
    add(engine, "urgent", [1, 2], PARAMS, Priority.URGENT, tenant="b")
    assert finish_order(engine) == ["urgent", "std-0", "std-1", "std-2", "bulk"]
