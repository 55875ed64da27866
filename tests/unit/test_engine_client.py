"""EngineClient and the engine core loop over real ZMQ sockets: streams, early exit,
backpressure, shutdown, the core going away, urgent steps, several clients.

The core runs on a thread of the test process here (the same loop and sockets as the
`twolane engine-core` process); the process itself is tested end to end under
tests/integration.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from engine_driver import record_schedules

from twolane.scheduler.client import EngineClient
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.core_process import EngineCoreProc
from twolane.scheduler.errors import EngineStoppedError
from twolane.scheduler.protocol import EngineAddress, TokenOutput
from twolane.scheduler.request import ErrorCode, FinishReason, Priority, SamplingParams

PROMPT = [72, 105, 33]


class ThreadCore:
    """An engine core loop on a thread, on sockets in a temporary directory."""

    def __init__(self, config: EngineConfig, ipc_dir: Path) -> None:
        self.address = EngineAddress(ipc_dir)
        self.proc = EngineCoreProc(config, self.address)
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.proc.run(self._ready.set)
        except BaseException as exc:  # a test may break the core on purpose
            self.error = exc

    def start(self) -> ThreadCore:
        self.thread.start()
        assert self._ready.wait(30), "the engine core did not start"
        return self

    def stop(self) -> None:
        self.proc.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def make_core(tmp_path: Path) -> Iterator:
    cores: list[ThreadCore] = []

    def make(**overrides: object) -> ThreadCore:
        config = EngineConfig(model="builtin", **{"num_blocks": 64, **overrides})  # type: ignore[arg-type]
        core = ThreadCore(config, tmp_path / f"core{len(cores)}").start()
        cores.append(core)
        return core

    yield make
    for core in cores:
        if core.thread.is_alive():
            core.stop()


async def connect(core: ThreadCore, name: str = "test") -> EngineClient:
    client = EngineClient(core.address, name)
    await client.start()
    await client.wait_ready(10)
    return client


@pytest.fixture
async def closing() -> AsyncIterator[list[EngineClient]]:
    clients: list[EngineClient] = []
    yield clients
    for client in clients:
        await client.close()


async def wait_for_idle(client: EngineClient) -> None:
    for _ in range(200):
        stats = await client.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_used_blocks == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine did not go idle: {await client.stats()}")


def long_params(max_tokens: int = 1000) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


async def test_streams_concurrent_requests_to_completion(make_core, closing) -> None:
    client = await connect(make_core(num_blocks=128))
    closing.append(client)

    async def run(i: int) -> tuple[int, FinishReason | None]:
        stream = client.add_request(f"r{i}", [*PROMPT, i], SamplingParams(max_tokens=5 + i))
        outs = [out async for out in stream]
        return sum(len(o.new_token_ids) for o in outs), outs[-1].finish_reason

    results = await asyncio.gather(*(run(i) for i in range(8)))
    assert results == [(5 + i, FinishReason.LENGTH) for i in range(8)]
    await wait_for_idle(client)


async def test_leaving_a_stream_early_aborts_and_frees_blocks(make_core, closing) -> None:
    client = await connect(make_core())
    closing.append(client)
    async for _ in client.add_request("early", PROMPT, long_params(500)):
        break
    await wait_for_idle(client)


async def test_a_full_interactive_queue_refuses_with_queue_full(make_core, closing) -> None:
    client = await connect(make_core(max_waiting_interactive=2, max_num_seqs=1))
    closing.append(client)
    streams = [client.add_request(f"q{i}", PROMPT, long_params(200)) for i in range(20)]
    firsts: list[TokenOutput] = await asyncio.gather(*(s.__aiter__().__anext__() for s in streams))
    refused = [o for o in firsts if o.error_code is ErrorCode.QUEUE_FULL]
    assert len(refused) >= 20 - 3  # one running, two waiting
    assert all(o.finish_reason is FinishReason.ERROR for o in refused)
    for stream in streams:
        stream.close()
    await wait_for_idle(client)


async def test_a_non_streaming_request_yields_one_output_with_every_token(
    make_core, closing
) -> None:
    client = await connect(make_core())
    closing.append(client)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    streamed = [out async for out in client.add_request("s", PROMPT, params)]
    whole = [out async for out in client.add_request("w", PROMPT, params, stream=False)]
    assert len(streamed) == 12 and len(whole) == 1
    assert whole[0].finished and whole[0].finish_reason is FinishReason.LENGTH
    assert whole[0].new_token_ids == [t for o in streamed for t in o.new_token_ids]


async def test_two_clients_share_one_core_and_each_gets_its_own_outputs(make_core, closing) -> None:
    core = make_core(num_blocks=128)
    first, second = await connect(core, "first"), await connect(core, "second")
    closing.extend([first, second])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    # The same request id from two clients would be refused; distinct ids are independent.
    a = first.add_request("a", PROMPT, params)
    b = second.add_request("b", [*PROMPT, 1], params)
    outs_a, outs_b = await asyncio.gather(_collect(a), _collect(b))
    assert {o.request_id for o in outs_a} == {"a"} and {o.request_id for o in outs_b} == {"b"}
    assert sum(len(o.new_token_ids) for o in outs_a) == 6
    stats = await second.stats()
    assert stats.num_steps > 0 and stats.num_used_blocks == 0


async def test_a_client_that_goes_away_has_its_requests_aborted(make_core, closing) -> None:
    core = make_core()
    leaving, staying = await connect(core, "leaving"), await connect(core, "staying")
    closing.append(staying)
    leaving.add_request("orphan", PROMPT, long_params())
    for _ in range(100):
        if (await staying.stats()).num_running == 1:
            break
        await asyncio.sleep(0.02)
    await leaving.close()
    await wait_for_idle(staying)


async def test_stopping_the_core_ends_every_stream_and_refuses_new_work(make_core, closing) -> None:
    core = make_core()
    client = await connect(core)
    closing.append(client)
    stream = client.add_request("long", PROMPT, long_params())
    updates = stream.__aiter__()
    assert not (await updates.__anext__()).finished
    await asyncio.to_thread(core.stop)
    outs = [out async for out in updates]
    assert outs[-1].finish_reason is FinishReason.ERROR
    assert outs[-1].error_code in (ErrorCode.ENGINE_STOPPING, ErrorCode.ENGINE_DEAD)
    for _ in range(100):
        if not client.is_ready:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(EngineStoppedError):
        client.add_request("after", PROMPT, SamplingParams())


async def test_a_failing_core_loop_ends_every_stream_with_an_error(make_core, closing) -> None:
    core = make_core()
    client = await connect(core)
    closing.append(client)
    stream = client.add_request("victim", PROMPT, long_params())
    updates = stream.__aiter__()
    assert not (await updates.__anext__()).finished

    def broken(now_s: float) -> None:
        raise RuntimeError("scheduler bug")

    # Fault injection into the scheduler: a bug outside the model's forward pass.
    core.proc.core.scheduler.schedule = broken  # type: ignore[method-assign]
    outs = [out async for out in updates]
    assert outs[-1].finish_reason is FinishReason.ERROR
    core.thread.join(10)
    assert isinstance(core.error, RuntimeError)
    assert core.proc.core.block_manager.num_used_blocks == 0


async def test_a_restarted_core_is_found_again(make_core, closing, tmp_path: Path) -> None:
    core = make_core()
    client = await connect(core)
    closing.append(client)
    first_instance = client.info.instance_id if client.info else ""
    await asyncio.to_thread(core.stop)
    for _ in range(200):
        if not client.is_ready:
            break
        await asyncio.sleep(0.01)
    again = ThreadCore(core.proc.core.config, core.address.ipc_dir).start()
    try:
        info = await client.wait_ready(10)
        assert info.instance_id != first_instance
        outs = [o async for o in client.add_request("again", PROMPT, SamplingParams(max_tokens=3))]
        assert outs[-1].finish_reason is FinishReason.LENGTH
    finally:
        await asyncio.to_thread(again.stop)


async def test_interactive_request_beside_batch_work_starts_in_an_urgent_step_of_its_own(
    make_core, closing
) -> None:
    core = make_core(num_blocks=256)
    client = await connect(core)
    closing.append(client)
    jobs = [
        client.add_request(
            f"job-{i}", [*PROMPT, i], long_params(400), priority=Priority.BULK, stream=False
        )
        for i in range(10)
    ]
    for _ in range(200):
        if (await client.stats()).num_running_batch == 10:
            break
        await asyncio.sleep(0.01)
    urgent = record_schedules(core.proc.core, urgent=True)
    chat = client.add_request("chat", PROMPT, SamplingParams(max_tokens=4))
    jobs[0].close()  # arrives mid-step too: applied once the step is over
    tokens = [t async for out in chat for t in out.new_token_ids]
    assert len(tokens) == 4
    started = [out for out in urgent if out.scheduled]
    assert [[s.seq.request_id for s in out.scheduled] for out in started] == [["chat"]]
    for job in jobs[1:]:
        job.close()
    await wait_for_idle(client)


async def _collect(stream: AsyncIterator[TokenOutput]) -> list[TokenOutput]:
    return [out async for out in stream]
