"""The messages between the engine core process and its clients (msgpack via msgspec).

Clients (the gRPC frontends, the job runner) send commands on a DEALER socket to the
core's ROUTER socket, which answers each client with its own requests' outputs. After
every step the core also publishes its load on a PUB socket, which the batch lane
reads for backpressure, and on another the block hashes that entered or left its
prefix cache, which a worker relays to the gateways. Token ids travel, never text,
and never pickles.

Times are `time.monotonic()` seconds: the core and its clients share one machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from twolane.scheduler.request import ErrorCode, FinishReason, Priority, SamplingParams

# ---- client -> core -------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag="add", frozen=True):
    """Queue a validated request. With `stream` False the only output is the final one."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: Priority
    arrival_time_s: float
    deadline_s: float | None = None
    stream: bool = True
    tenant: str = "default"


class AbortRequests(msgspec.Struct, tag="abort", frozen=True):
    request_ids: list[str]


class GetStats(msgspec.Struct, tag="stats", frozen=True):
    call_id: int


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Sent on every (re)connect; the core answers with EngineInfo."""

    client_name: str


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


Command = AddRequest | AbortRequests | GetStats | Hello | Shutdown

# ---- core -> client -------------------------------------------------------------------


class Load(msgspec.Struct, frozen=True):
    """What the batch lane needs to know to decide whether to pull more work."""

    instance_id: str
    num_steps: int
    num_running_interactive: int
    num_waiting_interactive: int
    num_running_batch: int
    num_waiting_batch: int
    max_num_batch_seqs: int
    num_free_blocks: int
    num_total_blocks: int
    # Requests the core holds (running or waiting) per tenant, for tenants with any: the
    # fronts and the job runner keep each tenant under its concurrency limit with it.
    num_requests_by_tenant: dict[str, int] = {}
    # Mean duration of the recent regular steps (exponentially weighted), in seconds.
    step_time_s: float = 0.0


class CacheEvents(msgspec.Struct, frozen=True):
    """Block hashes (scheduler/prefix_hash.py) that entered or left the prefix cache.

    `seq` counts the core's messages from 0 for each `instance_id`, so a reader knows
    when it missed one. A hash is in at most one of the two lists."""

    instance_id: str
    seq: int
    block_size: int
    stored: list[int]
    evicted: list[int]


class EngineStats(msgspec.Struct, frozen=True):
    num_running: int
    num_waiting: int
    num_waiting_interactive: int
    num_running_batch: int
    num_waiting_batch: int
    max_num_batch_seqs: int
    num_free_blocks: int
    num_used_blocks: int
    num_total_blocks: int
    block_size: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_steps: int


class EngineInfo(msgspec.Struct, tag="info", frozen=True):
    """The core's answer to Hello: who it is and what its model accepts."""

    instance_id: str  # new for every start of the core: a restart is visible
    model: str
    model_dir: str  # holds tokenizer.json, for clients that tokenize
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    block_size: int
    max_num_seqs: int
    load: Load


class TokenOutput(msgspec.Struct, frozen=True):
    """New tokens of one request; the last output of a request has a finish_reason."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    queue_time_s: float
    ttft_s: float | None
    error_code: ErrorCode | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StepOutputs(msgspec.Struct, tag="outputs", frozen=True):
    outputs: list[TokenOutput]


class StatsReply(msgspec.Struct, tag="stats_reply", frozen=True):
    call_id: int
    stats: EngineStats


Reply = EngineInfo | StepOutputs | StatsReply


def final_output(request_id: str, error_code: ErrorCode, error: str) -> TokenOutput:
    """A last output for a request that produced nothing (refused, or lost with the core)."""
    return TokenOutput(
        request_id=request_id,
        new_token_ids=[],
        new_logprobs=[],
        finish_reason=FinishReason.ERROR,
        num_prompt_tokens=0,
        num_output_tokens=0,
        num_cached_tokens=0,
        queue_time_s=0.0,
        ttft_s=None,
        error_code=error_code,
        error=error,
    )


@dataclass(frozen=True)
class EngineAddress:
    """Where one engine core listens: two unix sockets in a private directory."""

    ipc_dir: Path

    @property
    def commands(self) -> str:
        return f"ipc://{self.ipc_dir / 'engine.sock'}"

    @property
    def load(self) -> str:
        return f"ipc://{self.ipc_dir / 'load.sock'}"

    @property
    def cache_events(self) -> str:
        return f"ipc://{self.ipc_dir / 'cache.sock'}"


command_encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
reply_decoder = msgspec.msgpack.Decoder(Reply)
load_decoder = msgspec.msgpack.Decoder(Load)
cache_events_decoder = msgspec.msgpack.Decoder(CacheEvents)
