"""The engine core's loop: commands in over ZMQ, one step at a time, token ids out.

No asyncio, no gRPC, no NATS: the loop reads every command waiting on its ROUTER
socket, runs a step, sends each client the outputs of its own requests, and publishes
its load and the block hashes that entered or left its prefix cache. While a step
runs, the loop looks at the socket again at every safe point of the forward pass
(`safe_point`: mid-layer and between layers), so an interactive request that arrives
mid-step starts there in an urgent step instead of waiting for the step to end.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import cast

import structlog
import zmq

from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.protocol import (
    AbortRequests,
    AddRequest,
    CacheEvents,
    Command,
    EngineAddress,
    EngineInfo,
    GetStats,
    Hello,
    Load,
    Shutdown,
    StatsReply,
    StepOutputs,
    TokenOutput,
    command_decoder,
    command_encoder,
    final_output,
)
from twolane.scheduler.request import ErrorCode, Priority

log = structlog.get_logger(__name__)

# While idle the loop wakes this often to republish its load, so a client that lost a
# message (or just connected) never waits long for a fresh one.
IDLE_PUBLISH_S = 1.0
# ZMTP heartbeats: a client that stops answering for this long is dropped, and with it
# its requests.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
# Cache events are not conflated: a reader that falls this many messages behind loses
# some, notices the gap in `seq`, and asks its worker for a snapshot.
CACHE_EVENTS_HWM = 10_000


class EngineCoreProc:
    """Serves one `EngineCore` to any number of clients on `address`."""

    def __init__(self, config: EngineConfig, address: EngineAddress) -> None:
        self.instance_id = uuid.uuid4().hex[:12]
        self.core = EngineCore(config, instance_id=self.instance_id, record_cache_events=True)
        self.address = address
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        # An unknown peer makes send fail instead of dropping the message: that is how a
        # client that went away is noticed, and its requests aborted.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.SNDHWM, 0)
        self._router.setsockopt(zmq.RCVHWM, 0)
        self._router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self._router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self._router.setsockopt(zmq.LINGER, 1000)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, 64)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._cache_pub = self._ctx.socket(zmq.PUB)
        self._cache_pub.setsockopt(zmq.SNDHWM, CACHE_EVENTS_HWM)
        self._cache_pub.setsockopt(zmq.LINGER, 0)
        self._num_cache_events = 0
        self._owners: dict[str, bytes] = {}  # request id -> the client that sent it
        self._deferred_aborts: list[str] = []
        self._interactive_arrived = False
        self._in_step = False
        self._stopping = False
        self._last_load: tuple[object, ...] = ()
        self._last_publish_s = 0.0

    # ---- lifecycle ---------------------------------------------------------------

    def bind(self) -> None:
        self.address.ipc_dir.mkdir(parents=True, exist_ok=True)
        for url in (self.address.commands, self.address.load, self.address.cache_events):
            # A core that was killed leaves its socket file behind.
            with contextlib.suppress(FileNotFoundError):
                Path(url.removeprefix("ipc://")).unlink()
        self._router.bind(self.address.commands)
        self._pub.bind(self.address.load)
        self._cache_pub.bind(self.address.cache_events)
        log.info("engine core ready", ipc_dir=str(self.address.ipc_dir))

    def stop(self) -> None:
        """Ask the loop to end after the step in flight (safe from a signal handler)."""
        self._stopping = True

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Bind, then serve until `stop()` or a Shutdown command."""
        self.bind()
        self._publish_load(force=True)
        if on_ready is not None:
            on_ready()
        try:
            while not self._stopping:
                self._read_commands(wait=not self.core.has_unfinished)
                if self._stopping or not self.core.has_unfinished:
                    continue
                # Requests that arrived during the last step's final layers start on their
                # own, before the next regular step, which would carry every running decode.
                self._run_urgent_step()
                self._in_step = True
                try:
                    outputs = self.core.step(hook=self)
                finally:
                    self._in_step = False
                outputs.extend(self._apply_deferred_aborts())
                self._send(outputs)
                self._publish_load()
                self._publish_cache_events()
        finally:
            self._close()

    def _close(self) -> None:
        outputs = self.core.abort_all(ErrorCode.ENGINE_STOPPING, "the engine core stopped")
        self._send(outputs)
        self._publish_load(force=True)
        self._router.close(linger=1000)
        self._pub.close(linger=0)
        self._cache_pub.close(linger=0)
        self._ctx.term()
        log.info("engine core stopped", num_aborted=len(outputs))

    # ---- the forward hook ----------------------------------------------------------

    def safe_point(self) -> None:
        """Inside a step's forward pass: take new commands and start new interactive work."""
        events = cast(int, self._router.getsockopt(zmq.EVENTS))  # an int option
        if not events & zmq.POLLIN:
            return
        self._drain_commands()
        self._run_urgent_step()

    def _run_urgent_step(self) -> None:
        if not self._interactive_arrived:
            return
        self._interactive_arrived = False
        outputs = self.core.urgent_step()
        if outputs:
            self._send(outputs)
            self._publish_load()
            self._publish_cache_events()

    # ---- commands ----------------------------------------------------------------

    def _read_commands(self, wait: bool) -> None:
        if wait:
            started_s = time.perf_counter()
            ready = self._router.poll(int(IDLE_PUBLISH_S * 1000))
            self.core.metrics.step_phase_s.labels("idle").observe(time.perf_counter() - started_s)
            if not ready:
                self._publish_load(force=True)
                return
        started_s = time.perf_counter()
        if self._drain_commands():
            self.core.metrics.step_phase_s.labels("commands").observe(
                time.perf_counter() - started_s
            )

    def _drain_commands(self) -> int:
        """Handle every command waiting on the socket; returns how many there were."""
        num_commands = 0
        outputs: list[TokenOutput] = []
        while True:
            try:
                identity, payload = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            num_commands += 1
            try:
                command = command_decoder.decode(payload)
            except Exception:
                log.error("unreadable command dropped", client=identity.decode(errors="replace"))
                continue
            outputs.extend(self._handle(identity, command))
        self._send(outputs)
        if num_commands:
            self.core.refresh_gauges()
        return num_commands

    def _handle(self, identity: bytes, command: Command) -> list[TokenOutput]:
        if isinstance(command, AddRequest):
            return self._add(identity, command)
        if isinstance(command, AbortRequests):
            if self._in_step:
                # An abort frees blocks the step in flight may still write: apply it after.
                self._deferred_aborts.extend(command.request_ids)
                return []
            return self._abort(command.request_ids)
        if isinstance(command, GetStats):
            self._reply(identity, StatsReply(command.call_id, self.core.stats()))
        elif isinstance(command, Hello):
            log.info("engine client connected", client=command.client_name)
            self._reply(identity, self._info())
        elif isinstance(command, Shutdown):
            self.stop()
        return []

    def _add(self, identity: bytes, request: AddRequest) -> list[TokenOutput]:
        self._owners[request.request_id] = identity
        try:
            refused = self.core.add_request(request)
        except Exception:
            # One request the core cannot take must not end the loop serving all the others.
            log.exception("request refused on an error", request_id=request.request_id)
            self.core.abort(request.request_id)
            return [final_output(request.request_id, ErrorCode.REJECTED, "the engine refused it")]
        if refused is not None:
            return [refused]
        if request.priority is Priority.INTERACTIVE:
            self._interactive_arrived = True
        return []

    def _abort(self, request_ids: list[str]) -> list[TokenOutput]:
        return [out for rid in request_ids if (out := self.core.abort(rid)) is not None]

    def _apply_deferred_aborts(self) -> list[TokenOutput]:
        request_ids, self._deferred_aborts = self._deferred_aborts, []
        return self._abort(request_ids)

    def _info(self) -> EngineInfo:
        core = self.core
        return EngineInfo(
            instance_id=self.instance_id,
            model=core.config.model,
            model_dir=str(core.model_dir),
            vocab_size=core.vocab_size,
            max_model_len=core.max_model_len,
            eos_token_ids=sorted(core.eos_token_ids),
            block_size=core.config.block_size,
            max_num_seqs=core.config.max_num_seqs,
            load=core.load(),
        )

    # ---- outputs -----------------------------------------------------------------

    def _send(self, outputs: list[TokenOutput]) -> None:
        if not outputs:
            return
        started_s = time.perf_counter()
        by_client: dict[bytes, list[TokenOutput]] = defaultdict(list)
        for out in outputs:
            identity = (
                self._owners.pop(out.request_id, None)
                if out.finished
                else self._owners.get(out.request_id)
            )
            if identity is not None:
                by_client[identity].append(out)
        for identity, client_outputs in by_client.items():
            self._reply(identity, StepOutputs(client_outputs))
        if self._in_step or not self._stopping:
            self.core.metrics.step_phase_s.labels("send").observe(time.perf_counter() - started_s)

    def _reply(self, identity: bytes, message: EngineInfo | StepOutputs | StatsReply) -> None:
        try:
            self._router.send_multipart([identity, command_encoder.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self._forget_client(identity)

    def _forget_client(self, identity: bytes) -> None:
        """A client went away: nobody reads its requests' outputs, so end them."""
        orphans = [rid for rid, owner in self._owners.items() if owner == identity]
        for rid in orphans:
            del self._owners[rid]
            if self._in_step:
                self._deferred_aborts.append(rid)
            else:
                self.core.abort(rid)
        log.warning(
            "engine client gone; its requests aborted",
            client=identity.decode(errors="replace"),
            num_requests=len(orphans),
        )

    def _publish_load(self, force: bool = False) -> None:
        load = self.core.load()
        key = _load_key(load)
        now_s = time.monotonic()
        if not force and key == self._last_load and now_s - self._last_publish_s < IDLE_PUBLISH_S:
            return
        self._last_load = key
        self._last_publish_s = now_s
        with contextlib.suppress(zmq.Again):
            self._pub.send(command_encoder.encode(load), zmq.NOBLOCK)

    def _publish_cache_events(self) -> None:
        stored, evicted = self.core.drain_cache_events()
        if not stored and not evicted:
            return
        events = CacheEvents(
            instance_id=self.instance_id,
            seq=self._num_cache_events,
            block_size=self.core.config.block_size,
            stored=stored,
            evicted=evicted,
        )
        self._num_cache_events += 1
        with contextlib.suppress(zmq.Again):
            self._cache_pub.send(command_encoder.encode(events), zmq.NOBLOCK)


def _load_key(load: Load) -> tuple[object, ...]:
    return (
        load.num_running_interactive,
        load.num_waiting_interactive,
        load.num_running_batch,
        load.num_waiting_batch,
        load.num_free_blocks,
        tuple(sorted(load.num_requests_by_tenant.items())),
    )


def run_engine_core(
    config: EngineConfig, address: EngineAddress, on_ready: Callable[[], None] | None = None
) -> None:
    """The body of `twolane engine-core`: load the model, then serve until SIGTERM."""
    if config.threads:
        import torch

        # Fewer intra-op threads than cores when other busy processes share the machine:
        # a parallel op whose thread has to share a core stalls for milliseconds.
        torch.set_num_threads(config.threads)
    proc = EngineCoreProc(config, address)
    proc.install_signal_handlers()
    proc.run(on_ready)
