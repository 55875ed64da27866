"""The frozen per-process configuration of `twolane serve`, built once by the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from twolane.scheduler.config import EngineConfig
from twolane.services.logging import LOG_LEVELS

DEFAULT_PORT = 50051


def env_default(name: str, fallback: str) -> str:
    """An argparse default read from the environment; argparse applies `type` to it."""
    return os.environ.get(name, fallback)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
        max_waiting_interactive: passed to the engine (see EngineConfig).
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

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
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
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

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
            "--num-blocks",
            type=int,
            default=env_default("TWOLANE_NUM_BLOCKS", "0"),
            help="KV cache blocks; 0 sizes the cache from memory (env TWOLANE_NUM_BLOCKS)",
        )
        add(
            "--max-num-seqs",
            type=int,
            default=env_default("TWOLANE_MAX_NUM_SEQS", "64"),
            help="most sequences per step (env TWOLANE_MAX_NUM_SEQS)",
        )
        add(
            "--max-model-len",
            type=int,
            default=env_default("TWOLANE_MAX_MODEL_LEN", "0"),
            help="longest sequence; 0 takes the model's own (env TWOLANE_MAX_MODEL_LEN)",
        )
        add(
            "--max-waiting",
            dest="max_waiting_interactive",
            type=int,
            default=env_default("TWOLANE_MAX_WAITING", "256"),
            help="interactive requests allowed to wait before new ones get "
            "RESOURCE_EXHAUSTED (env TWOLANE_MAX_WAITING)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        """Build from parsed flags; every field has a flag of the same dest name."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
