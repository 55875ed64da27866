"""AsyncEngine: streams, early exit aborts, backpressure, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from engine_driver import record_schedules

from twolane.scheduler.async_engine import AsyncEngine
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.errors import EngineStoppedError, QueueFullError
from twolane.scheduler.request import FinishReason, Priority, SamplingParams


async def wait_for_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_used_blocks == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


async def test_streams_concurrent_requests_to_completion() -> None:
    engine = AsyncEngine(EngineConfig(model="builtin", num_blocks=128))
    await engine.start()
    try:

        async def run(i: int) -> tuple[int, FinishReason | None]:
            stream = engine.add_request(
                f"r{i}", prompt=f"q{i}", params=SamplingParams(max_tokens=5 + i)
            )
            tokens = []
            async for out in stream:
                tokens.extend(out.new_token_ids)
            return len(tokens), out.finish_reason

        results = await asyncio.gather(*(run(i) for i in range(8)))
        assert results == [(5 + i, FinishReason.LENGTH) for i in range(8)]
        await wait_for_idle(engine)
    finally:
        await engine.shutdown()


async def test_leaving_a_stream_early_aborts_and_frees_blocks() -> None:
    engine = AsyncEngine(EngineConfig(model="builtin", num_blocks=64))
    await engine.start()
    try:
        stream = engine.add_request(
            "early", prompt="tell me", params=SamplingParams(max_tokens=500, ignore_eos=True)
        )
        async for _ in stream:
            break
        await wait_for_idle(engine)
    finally:
        await engine.shutdown()


async def test_waiting_queue_bound_refuses_at_once() -> None:
    engine = AsyncEngine(EngineConfig(model="builtin", num_blocks=64, max_waiting_interactive=2))
    await engine.start()
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    try:
        streams = []
        with pytest.raises(QueueFullError):
            for i in range(50):
                streams.append(engine.add_request(f"q{i}", prompt="x", params=params))
        assert len(streams) >= 2
        for s in streams:
            s.close()
        await wait_for_idle(engine)
    finally:
        await engine.shutdown()


async def test_shutdown_aborts_in_flight_requests_and_refuses_new_ones() -> None:
    engine = AsyncEngine(EngineConfig(model="builtin", num_blocks=64))
    await engine.start()
    stream = engine.add_request(
        "long", prompt="go", params=SamplingParams(max_tokens=1000, ignore_eos=True)
    )
    await engine.shutdown()
    outs = [out async for out in stream]
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(EngineStoppedError):
        engine.add_request("after", prompt="x", params=SamplingParams())


async def test_a_non_streaming_request_yields_one_output_with_every_token() -> None:
    engine = AsyncEngine(EngineConfig(model="builtin", num_blocks=64))
    await engine.start()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    try:
        streamed = [
            out async for out in engine.add_request("s", prompt="same prompt", params=params)
        ]
        whole = [
            out
            async for out in engine.add_request(
                "w", prompt="same prompt", params=params, stream=False
            )
        ]
        assert len(streamed) == 12 and len(whole) == 1
        assert whole[0].finished and whole[0].finish_reason is FinishReason.LENGTH
        assert whole[0].new_token_ids == [t for o in streamed for t in o.new_token_ids]
        assert whole[0].new_text == "".join(o.new_text for o in streamed)
    finally:
        await engine.shutdown()


async def test_a_failing_engine_ends_every_stream_with_an_error_and_refuses_new_work() -> None:
    engine = AsyncEngine(EngineConfig(model="builtin", num_blocks=64))
    await engine.start()
    params = SamplingParams(max_tokens=1000, ignore_eos=True)
    stream = engine.add_request("victim", prompt="x", params=params)
    updates = stream.__aiter__()
    first = await updates.__anext__()
    assert not first.finished

    def broken(now_s: float) -> None:
        raise RuntimeError("scheduler bug")

    # Fault injection into the scheduler: a bug outside the model's forward pass.
    engine.engine.scheduler.schedule = broken  # type: ignore[method-assign]
    outs = [out async for out in updates]
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ERROR
    assert "scheduler bug" in (outs[-1].error or "")
    assert engine.engine.block_manager.num_used_blocks == 0
    with pytest.raises(EngineStoppedError):
        engine.add_request("after", prompt="x", params=params)
    await engine.shutdown()


async def test_interactive_request_beside_batch_work_starts_in_an_urgent_step_of_its_own() -> None:
    engine = AsyncEngine(EngineConfig(model="builtin", num_blocks=256))
    await engine.start()
    try:
        long_job = SamplingParams(max_tokens=400, ignore_eos=True)
        jobs = [
            engine.add_request(
                f"job-{i}", prompt=f"job {i}", params=long_job, priority=Priority.BULK, stream=False
            )
            for i in range(10)
        ]
        for _ in range(200):
            if engine.stats().num_running_batch == 10:
                break
            await asyncio.sleep(0.01)
        urgent = record_schedules(engine.engine, urgent=True)
        chat = engine.add_request("chat", prompt="hi", params=SamplingParams(max_tokens=4))
        engine.abort("job-0")  # arrives mid-step too: applied once the step is over
        tokens = [t async for out in chat for t in out.new_token_ids]
        assert len(tokens) == 4
        started = [out for out in urgent if out.scheduled]
        assert [[s.seq.request_id for s in out.scheduled] for out in started] == [["chat"]]
        first = [out async for out in jobs[0]]
        assert first[-1].finish_reason is FinishReason.ABORT
        for job in jobs[1:]:
            job.close()
        await wait_for_idle(engine)
    finally:
        await engine.shutdown()
