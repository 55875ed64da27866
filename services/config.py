"""The frozen configuration of each twolane process, declared once per option.

Every process builds its one config at the edge (the CLI) from the same declarations:
`twolane serve` holds them all and hands each child the flags of its own part
(`options.to_argv`), so a child rebuilds exactly what the supervisor validated.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from twolane.scheduler.config import EngineConfig, option
from twolane.services import options
from twolane.services.logging import LOG_LEVELS

DEFAULT_PORT = 50051


def env_default(name: str, fallback: str) -> str:
    """An argparse default of a client command, read from the environment."""
    return os.environ.get(name, fallback)


def default_data_dir() -> str:
    """Where `twolane serve` keeps the embedded nats-server's JetStream store."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "twolane")


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be in [0, 65535], got {port}")


@dataclass(frozen=True)
class LogConfig:
    log_json: bool = option(False, "log JSON lines instead of the console format")
    log_level: str = option("info", "least severe level logged", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")


@dataclass(frozen=True)
class JobsConfig:
    """The batch lane: where NATS is and how jobs are kept, retried and pulled.

    `fail_prompt_prefix` is fault injection for tests, off when empty: a job whose prompt
    starts with it fails on every attempt as if the engine had failed (environment
    variable TWOLANE_FAULT_FAIL_PROMPT_PREFIX only; no flag).
    """

    nats_url: str = option(
        "",
        "NATS server URL (of a cluster: several, comma separated); unset, `twolane serve` "
        "starts an embedded nats-server",
    )
    nats_creds: str = option(
        "",
        "file with the NATS user and password to connect with, one per line (`twolane "
        "serve` writes the services' own when auth is on)",
    )
    data_dir: str = field(
        default_factory=default_data_dir,
        metadata={
            "help": "store of the embedded nats-server (<data-dir>/jetstream); its URL is "
            "written to <data-dir>/nats.url"
        },
    )
    nats_replicas: int = option(
        1,
        "replicas of each batch-lane stream and KV bucket: 1 on one nats-server, 3 on a "
        "cluster (a stream keeps serving while a majority of its replicas is up)",
    )
    max_queued_jobs: int = option(
        100_000, "jobs the queue holds before SubmitJob is refused", flag="job-max-queued-jobs"
    )
    max_queued_bytes: int = option(
        256 * 1024 * 1024, "bytes the job queue holds", flag="job-max-queued-bytes"
    )
    result_ttl_s: float = option(
        24 * 3600.0, "seconds results and events are kept", flag="job-result-ttl-s"
    )
    record_ttl_s: float = option(
        7 * 24 * 3600.0,
        "seconds job records and idempotency keys live",
        flag="job-record-ttl-s",
    )
    ack_wait_s: float = option(
        30.0, "seconds without progress before a job is redelivered", flag="job-ack-wait-s"
    )
    max_deliver: int = option(5, "deliveries before a job is dead-lettered", flag="job-max-deliver")
    retry_backoff_s: float = option(
        1.0, "first retry delay in seconds (doubles each retry)", flag="job-retry-backoff-s"
    )
    max_batch_inflight: int = option(
        0, "most jobs a worker runs at once; 0: max-num-seqs", flag="job-max-batch-inflight"
    )
    niceness: int = option(
        10,
        "CPU niceness the job runner adds to its own, so that job bookkeeping yields the "
        "CPU to the processes serving interactive calls (0 keeps the same priority)",
        flag="job-niceness",
    )
    tenant_max_queued_jobs: int = option(
        10_000,
        "jobs one tenant may have queued (with auth on), so that no tenant fills the shared queue",
        flag="job-tenant-max-queued",
    )
    fail_prompt_prefix: str = field(
        default_factory=lambda: os.environ.get("TWOLANE_FAULT_FAIL_PROMPT_PREFIX", "")
    )

    def __post_init__(self) -> None:
        for name in (
            "max_queued_jobs",
            "max_queued_bytes",
            "max_deliver",
            "tenant_max_queued_jobs",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("result_ttl_s", "record_ttl_s", "ack_wait_s"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be at least 1 second, got {getattr(self, name)}")
        if self.retry_backoff_s < 0 or self.max_batch_inflight < 0:
            raise ValueError("retry_backoff_s and max_batch_inflight must be >= 0")
        if not 1 <= self.nats_replicas <= 5:
            raise ValueError(f"nats_replicas must be in [1, 5], got {self.nats_replicas}")
        if not 0 <= self.niceness <= 19:
            raise ValueError(f"niceness must be in [0, 19], got {self.niceness}")


@dataclass(frozen=True)
class ListenConfig:
    """Where a gRPC front listens, and how it stops."""

    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(DEFAULT_PORT, "gRPC port; 0 picks a free one (logged on `listening`)")
    grace_period_s: float = option(
        10.0, "seconds in-flight requests get to finish on SIGTERM", flag="grace-period"
    )

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")


@dataclass(frozen=True)
class SecurityConfig:
    """Who may call, over what, and what the logs keep (see README, "Security")."""

    api_keys: str = option(
        "", "keys file (from `twolane keys create`); set, every call needs a key"
    )
    tls_cert: str = option("", "PEM certificate: serve TLS only, with --tls-key")
    tls_key: str = option("", "PEM private key of --tls-cert")
    tls_client_ca: str = option(
        "", "PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    log_prompts: bool = option(False, "put prompts and outputs in the log (off: never)")
    audit_log: str = option(
        "",
        "JSON-lines audit log of submits, cancels and result reads; default <data-dir>/audit.log",
    )

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for name in ("api_keys", "tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')}: no such file: {path}")

    @property
    def auth_on(self) -> bool:
        return bool(self.api_keys)

    def audit_path(self, data_dir: str) -> Path:
        return Path(self.audit_log) if self.audit_log else Path(data_dir) / "audit.log"


@dataclass(frozen=True)
class ChildConfig:
    """How a child process finds its engine core and tells its supervisor it is ready.
    Set by `twolane serve`; a child started by hand passes `--ipc-dir` itself."""

    ipc_dir: str = option("", "directory of the engine core's sockets")
    ready_fd: int = option(-1, "file descriptor to write one line to once ready; -1: none")


@dataclass(frozen=True)
class EngineCoreProcessConfig:
    """`twolane engine-core`: the scheduler, KV cache and model in a loop of their own."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    child: ChildConfig = field(default_factory=ChildConfig)

    def __post_init__(self) -> None:
        if not self.child.ipc_dir:
            raise ValueError("engine-core needs --ipc-dir")


@dataclass(frozen=True)
class FrontendProcessConfig:
    """`twolane frontend`: the gRPC API over one engine core."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)
    child: ChildConfig = field(default_factory=ChildConfig)
    api_server_count: int = option(
        1, "gRPC frontend processes sharing the port, all clients of one engine core"
    )
    reuse_port: bool = option(
        False,
        "share the port with the other frontends of one `twolane serve` (SO_REUSEPORT); "
        "the supervisor checks first that nobody else holds it",
    )

    def __post_init__(self) -> None:
        if not self.child.ipc_dir:
            raise ValueError("frontend needs --ipc-dir")


@dataclass(frozen=True)
class JobRunnerProcessConfig:
    """`twolane jobs`: the JetStream consumer that feeds the engine core batch work."""

    jobs: JobsConfig = field(default_factory=JobsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)
    child: ChildConfig = field(default_factory=ChildConfig)
    grace_period_s: float = option(
        10.0, "seconds running jobs get to finish on SIGTERM", flag="grace-period"
    )

    def __post_init__(self) -> None:
        if not self.child.ipc_dir:
            raise ValueError("jobs needs --ipc-dir")
        if not self.jobs.nats_url:
            raise ValueError("jobs needs --nats-url")


@dataclass(frozen=True)
class ClusterConfig:
    """How a `twolane worker` announces itself to the gateways (services/membership.py)."""

    advertise_address: str = option(
        "",
        "HOST[:PORT] gateways reach this worker's gRPC port at; default: --host (this "
        "machine's name when --host is 0.0.0.0 or ::) and the port it listens on",
    )
    heartbeat_interval_s: float = option(
        1.0, "seconds between two announcements of this worker (with its load)"
    )
    worker_ttl_s: float = option(
        5.0,
        "seconds a worker stays in the twolane_workers bucket, and in a gateway's view, "
        "after its last announcement",
    )

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError(
                f"heartbeat_interval_s must be positive, got {self.heartbeat_interval_s}"
            )
        if self.worker_ttl_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"worker_ttl_s ({self.worker_ttl_s}) must be at least twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}): one lost heartbeat "
                "must not drop a worker"
            )
        if self.advertise_address:
            split_host_port(self.advertise_address)


def split_host_port(address: str) -> tuple[str, int | None]:
    """`HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT` as (host, port or None).

    Raises:
        ValueError: not one of those forms.
    """
    host, port = address, ""
    if address.startswith("["):
        host, _, rest = address.partition("]")
        host += "]"
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected [IPV6]:PORT, got {address!r}")
        port = rest[1:]
    elif ":" in address:
        host, _, port = address.rpartition(":")
    if not host or host == "[]" or (":" in host and not host.startswith("[")):
        raise ValueError(f"expected HOST[:PORT] (IPv6 in brackets), got {address!r}")
    if port and not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"expected a port in [1, 65535] in {address!r}")
    return host, int(port) if port else None


ROUTE_POLICIES = ("cache-aware", "round-robin")


@dataclass(frozen=True)
class RoutingConfig:
    """How a gateway picks the worker for an interactive call (services/routing.py)."""

    policy: str = option(
        "cache-aware",
        "cache-aware: the worker with the best score of cached prompt share minus "
        "weighted load; round-robin: the workers in turn",
        flag="route-policy",
        choices=ROUTE_POLICIES,
    )
    load_weight: float = option(
        4.0,
        "what load costs in the score: a worker pays this much cached prompt share per "
        "max-num-seqs interactive requests it runs or queues (4: a fully cached prompt "
        "outweighs a quarter of max-num-seqs more requests)",
        flag="route-load-weight",
    )

    def __post_init__(self) -> None:
        if self.policy not in ROUTE_POLICIES:
            raise ValueError(f"route policy must be one of {ROUTE_POLICIES}, got {self.policy!r}")
        if self.load_weight < 0:
            raise ValueError(f"route load weight must be >= 0, got {self.load_weight}")


@dataclass(frozen=True)
class ServeConfig:
    """`twolane serve` (and `twolane worker`): the supervisor of every process."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics_port: int = option(
        -1, "Prometheus metrics over HTTP on this port; -1 off, 0 a free port (logged)"
    )
    api_server_count: int = option(
        1, "gRPC frontend processes sharing the port, all clients of one engine core"
    )

    def __post_init__(self) -> None:
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be -1 (off) or a port, got {self.metrics_port}")
        if self.api_server_count < 1:
            raise ValueError(f"api_server_count must be >= 1, got {self.api_server_count}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        options.add_options(parser, ServeConfig)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        return options.from_args(cls, args)


@dataclass(frozen=True)
class WorkerConfig(ServeConfig):
    """`twolane worker`: the processes of `twolane serve` on a NATS shared with other
    workers and gateways, announced to the gateways through it."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.jobs.nats_url:
            raise ValueError(
                "needs --nats-url (env TWOLANE_NATS_URL): a worker shares one NATS with others"
            )
