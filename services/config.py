"""The frozen per-process configuration of `twolane serve`, built once by the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from twolane.scheduler.config import EngineConfig
from twolane.services.logging import LOG_LEVELS

DEFAULT_PORT = 50051


def env_default(name: str, fallback: str) -> str:
    """An argparse default read from the environment; argparse applies `type` to it."""
    return os.environ.get(name, fallback)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_data_dir() -> str:
    """Where `twolane serve` keeps the embedded nats-server's JetStream store."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "twolane")


def add_number_flags(
    parser: argparse.ArgumentParser,
    rows: tuple[tuple[str, type, str, str], ...],
    prefix: str = "",
) -> None:
    """Add `--[prefix-]dest` flags from (dest, type, default, help) rows; each one's default
    comes from `TWOLANE_[PREFIX_]DEST` when that is set."""
    for dest, kind, fallback, text in rows:
        name = f"{prefix}_{dest}" if prefix else dest
        env = "TWOLANE_" + name.upper()
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=dest,
            type=kind,
            default=env_default(env, fallback),
            help=f"{text} (env {env})",
        )


@dataclass(frozen=True)
class JobsConfig:
    """The batch lane: where NATS is and how jobs are kept, retried and pulled.

    Args:
        nats_url: NATS server URL; empty starts an embedded nats-server (serve only).
        data_dir: the embedded nats-server's store lives in `<data_dir>/jetstream`,
            and its URL is written to `<data_dir>/nats.url` for the CLI to find.
        max_queued_jobs, max_queued_bytes: limits of the TWOLANE_JOBS stream; a
            full stream refuses SubmitJob with RESOURCE_EXHAUSTED.
        result_ttl_s: how long results and completion events are kept.
        record_ttl_s: how long job records and idempotency keys are kept.
        ack_wait_s: a worker that neither finishes a job nor reports progress for
            this long loses it to another worker.
        max_deliver: deliveries of one job before it is dead-lettered.
        retry_backoff_s: delay before the first retry; it doubles each time.
        max_batch_inflight: most batch jobs one worker runs at once; 0 takes the
            engine's max_num_seqs.
        fail_prompt_prefix: fault injection for tests, off when empty: a job whose
            prompt starts with it fails on every attempt as if the engine had
            failed (env TWOLANE_FAULT_FAIL_PROMPT_PREFIX only; no flag).
    """

    nats_url: str = ""
    data_dir: str = field(default_factory=default_data_dir)
    max_queued_jobs: int = 100_000
    max_queued_bytes: int = 256 * 1024 * 1024
    result_ttl_s: float = 24 * 3600.0
    record_ttl_s: float = 7 * 24 * 3600.0
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    retry_backoff_s: float = 1.0
    max_batch_inflight: int = 0
    fail_prompt_prefix: str = ""

    def __post_init__(self) -> None:
        for name in ("max_queued_jobs", "max_queued_bytes", "max_deliver"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("result_ttl_s", "record_ttl_s", "ack_wait_s"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be at least 1 second, got {getattr(self, name)}")
        if self.retry_backoff_s < 0 or self.max_batch_inflight < 0:
            raise ValueError("retry_backoff_s and max_batch_inflight must be >= 0")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Batch-lane flags; each has a TWOLANE_* environment variable."""
        add = parser.add_argument
        add(
            "--nats-url",
            default=env_default("TWOLANE_NATS_URL", ""),
            help="NATS server URL; unset, serve starts an embedded nats-server "
            "(env TWOLANE_NATS_URL)",
        )
        add(
            "--data-dir",
            default=env_default("TWOLANE_DATA_DIR", default_data_dir()),
            help="store of the embedded nats-server (env TWOLANE_DATA_DIR)",
        )
        numbers: tuple[tuple[str, type, str, str], ...] = (
            ("max_queued_jobs", int, "100000", "jobs the queue holds before SubmitJob is refused"),
            ("max_queued_bytes", int, str(256 * 1024 * 1024), "bytes the queue holds"),
            ("result_ttl_s", float, str(24 * 3600), "seconds results and events are kept"),
            (
                "record_ttl_s",
                float,
                str(7 * 24 * 3600),
                "seconds job records and idempotency keys live",
            ),
            ("ack_wait_s", float, "30", "seconds without progress before a job is redelivered"),
            ("max_deliver", int, "5", "deliveries before a job is dead-lettered"),
            ("retry_backoff_s", float, "1", "first retry delay in seconds (doubles each retry)"),
            ("max_batch_inflight", int, "0", "most jobs a worker runs at once; 0: max_num_seqs"),
        )
        add_number_flags(parser, numbers, prefix="job")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> JobsConfig:
        values = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
        }
        values["fail_prompt_prefix"] = os.environ.get("TWOLANE_FAULT_FAIL_PROMPT_PREFIX", "")
        return cls(**values)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `twolane serve` needs; components take their part of it.

    Args:
        model: a Hugging Face checkpoint directory, or "builtin".
        host: interface to listen on.
        port: TCP port; 0 picks a free one (it is logged in the `listening` line).
        log_json: JSON log lines instead of the console format.
        log_level: debug, info, warning or error.
        grace_period_s: on SIGTERM, how long in-flight requests may take to finish.
        device, dtype, num_blocks, max_num_seqs, max_model_len,
        max_waiting_interactive, block_size, max_num_batched_tokens,
        reserved_block_fraction, max_batch_share, interactive_ttft_target_s: passed to
        the engine (see EngineConfig).
        threads: torch intra-op threads for the engine; 0 keeps torch's default (one per
            core). Fewer help when other busy processes share the machine.
        metrics_port: Prometheus metrics over HTTP on this port; -1 turns them off, 0 picks a
            free port (logged).
        jobs: the batch lane (see JobsConfig).
    """

    model: str = "builtin"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    log_json: bool = False
    log_level: str = "info"
    grace_period_s: float = 10.0
    device: str = "cpu"
    dtype: str = "float32"
    num_blocks: int = 0
    max_num_seqs: int = 64
    max_model_len: int = 0
    max_waiting_interactive: int = 256
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    reserved_block_fraction: float = 0.1
    max_batch_share: float = 0.875
    interactive_ttft_target_s: float = 0.5
    threads: int = 0
    metrics_port: int = -1
    jobs: JobsConfig = field(default_factory=JobsConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be -1 (off) or a port, got {self.metrics_port}")
        # Fail at startup, not after the model has loaded.
        self.engine_config()

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            num_blocks=self.num_blocks,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            max_waiting_interactive=self.max_waiting_interactive,
            block_size=self.block_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            reserved_block_fraction=self.reserved_block_fraction,
            max_batch_share=self.max_batch_share,
            interactive_ttft_target_s=self.interactive_ttft_target_s,
        )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Flags of `twolane serve`; each has a TWOLANE_* environment variable."""
        add = parser.add_argument
        add(
            "--model",
            default=env_default("TWOLANE_MODEL", "builtin"),
            help="checkpoint directory or 'builtin' (env TWOLANE_MODEL)",
        )
        add(
            "--host",
            default=env_default("TWOLANE_HOST", "127.0.0.1"),
            help="interface to listen on (env TWOLANE_HOST)",
        )
        add(
            "--port",
            type=int,
            default=env_default("TWOLANE_PORT", str(DEFAULT_PORT)),
            help="port; 0 picks a free one (env TWOLANE_PORT)",
        )
        add(
            "--log-json",
            action="store_true",
            default=env_flag("TWOLANE_LOG_JSON"),
            help="log JSON lines (env TWOLANE_LOG_JSON=1)",
        )
        add(
            "--log-level",
            choices=LOG_LEVELS,
            default=env_default("TWOLANE_LOG_LEVEL", "info"),
            help="env TWOLANE_LOG_LEVEL",
        )
        add(
            "--grace-period",
            dest="grace_period_s",
            type=float,
            default=env_default("TWOLANE_GRACE_PERIOD_S", "10"),
            help="seconds in-flight requests get to finish on SIGTERM (env TWOLANE_GRACE_PERIOD_S)",
        )
        add(
            "--device",
            choices=("cpu", "cuda"),
            default=env_default("TWOLANE_DEVICE", "cpu"),
            help="env TWOLANE_DEVICE",
        )
        add(
            "--dtype",
            choices=("float32", "bfloat16", "float16"),
            default=env_default("TWOLANE_DTYPE", "float32"),
            help="env TWOLANE_DTYPE",
        )
        add(
            "--max-waiting",
            dest="max_waiting_interactive",
            type=int,
            default=env_default("TWOLANE_MAX_WAITING", "256"),
            help="interactive requests allowed to wait before new ones get "
            "RESOURCE_EXHAUSTED (env TWOLANE_MAX_WAITING)",
        )
        engine_knobs: tuple[tuple[str, type, str, str], ...] = (
            ("num_blocks", int, "0", "KV cache blocks; 0 sizes the cache from memory"),
            ("max_num_seqs", int, "64", "most sequences per step"),
            ("max_model_len", int, "0", "longest sequence; 0 takes the model's own"),
            ("block_size", int, "16", "tokens per KV block"),
            ("max_num_batched_tokens", int, "2048", "most tokens (prefill + decode) per step"),
            (
                "reserved_block_fraction",
                float,
                "0.1",
                "share of KV blocks new batch work leaves free for interactive requests",
            ),
            ("max_batch_share", float, "0.875", "share of max-num-seqs batch work may hold"),
            (
                "interactive_ttft_target_s",
                float,
                "0.5",
                "interactive first-token target; batch work per step keeps steps within half",
            ),
            ("threads", int, "0", "torch threads for the engine; 0: one per core"),
            ("metrics_port", int, "-1", "Prometheus metrics port; -1 off, 0 a free port"),
        )
        add_number_flags(parser, engine_knobs)
        JobsConfig.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        """Build from parsed flags; every field has a flag of the same dest name."""
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "jobs"]
        values = {name: getattr(args, name) for name in fields}
        return cls(**values, jobs=JobsConfig.from_args(args))
