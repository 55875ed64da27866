"""`twolane serve` and `twolane worker`: the supervisor of one machine's processes.

It starts nats-server (unless `--nats-url`), then the children, each as
`twolane <role> ...` so that its command line names its role:

    engine-core     the scheduler, KV cache and model, in a loop of their own
    frontend (xN)   the gRPC API on one shared port, tokenizing and streaming
    http            the OpenAI-compatible API and the Batch API (with --http-port)
    jobs            the JetStream consumer feeding the engine core batch work
    webhooks        `twolane webhooks serve`: POSTs completion events to webhook URLs

The children start side by side: those around the engine core wait for its answer
themselves, importing and connecting while it loads the model. A child that dies is
noticed at once and started again, with backoff. On SIGTERM the
children stop in order: frontends and the HTTP front (draining their calls), the job
runner (finishing or giving back its jobs), the webhook service (finishing its attempts
in flight), the engine core, and last nats-server. The webhook service always runs: a
job submitted with a webhook_url is never left undelivered because nobody was there to
deliver it.

A worker's supervisor also announces the worker to the gateways and relays its
engine's prefix-cache events (services/membership.py): on SIGTERM it says "draining"
first, and deletes its record once the children have stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from twolane.scheduler.config import served_model_name
from twolane.services import jobs, nats_auth, options
from twolane.services.availability import Availability
from twolane.services.config import (
    NATS_URL_REQUIRED_HELP,
    ChildConfig,
    EngineCoreProcessConfig,
    FrontendProcessConfig,
    HttpProcessConfig,
    JobRunnerProcessConfig,
    ServeConfig,
    WebhookProcessConfig,
    WorkerConfig,
)
from twolane.services.keys import KeyStore
from twolane.services.membership import WorkerAnnouncer, advertised_address, announce_worker
from twolane.services.metrics_http import MetricsServer, multiprocess_registry
from twolane.services.nats_embedded import EmbeddedNats, death_signal_hook
from twolane.services.process import run_process, stop_event, unless_stopped

log = structlog.get_logger(__name__)

FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
# A child that ran this long before dying starts again after the first delay.
STABLE_AFTER_S = 60.0
STOP_TIMEOUT_S = 15.0
TENANT_WATCH_S = 1.0


WORKER_DATA_DIR_HELP = (
    "this worker's own state: its identity across restarts (so a restarted worker gives "
    "back at once the jobs it held), webhook signing secrets, the audit log"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve both lanes on this machine (starts nats-server unless --nats-url)",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ServeConfig.add_arguments(serve)
    serve.set_defaults(func=serve_main)
    worker = subparsers.add_parser(
        "worker",
        help="host an engine for a gateway: run jobs from a shared NATS, serve --port",
        description="An engine core with its frontend and job runner, on a NATS shared with "
        "other workers and gateways (--nats-url is required: a worker starts no nats-server).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # A worker keeps --data-dir though it starts no NATS: its identity (worker_slot.py)
    # and the webhook secrets live there.
    options.add_options(
        worker,
        WorkerConfig,
        helps={"nats_url": NATS_URL_REQUIRED_HELP, "data_dir": WORKER_DATA_DIR_HELP},
    )
    worker.set_defaults(func=worker_main)


def serve_main(args: argparse.Namespace) -> int:
    return run_process("serve", args, ServeConfig.from_args, serve)


def worker_main(args: argparse.Namespace) -> int:
    return run_process("worker", args, lambda a: options.from_args(WorkerConfig, a), serve)


@dataclass
class Child:
    """One supervised process and how often it had to be started again."""

    role: str
    argv: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    started_s: float = 0.0
    ready: bool = False
    num_restarts: int = 0
    restart_delay_s: float = FIRST_RESTART_DELAY_S
    _ready_read_fd: int = -1

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


@dataclass
class Supervisor:
    config: ServeConfig
    nats_url: str
    nats_creds: str
    ipc_dir: Path
    port: int
    metrics_dir: Path
    http_port: int = -1  # -1: no HTTP front
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def child_config(self) -> ChildConfig:
        return ChildConfig(ipc_dir=str(self.ipc_dir))

    def plan(self) -> list[Child]:
        """The children in start order (and the reverse of stop order)."""
        config, child = self.config, self.child_config()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        jobs_config = dataclasses.replace(
            config.jobs, nats_url=self.nats_url, nats_creds=self.nats_creds
        )
        # Each front enforces its share of a tenant's rate limits.
        num_fronts = config.api_server_count + (1 if self.http_port >= 0 else 0)
        core = EngineCoreProcessConfig(engine=config.engine, log=config.log, child=child)
        frontend = FrontendProcessConfig(
            listen=dataclasses.replace(config.listen, port=self.port),
            jobs=jobs_config,
            security=config.security,
            # Frontends check webhook URLs at submit by the deliverer's own rules.
            webhooks=config.webhooks,
            log=config.log,
            child=child,
            api_server_count=config.api_server_count,
            num_fronts=num_fronts,
            reuse_port=True,
        )
        runner = JobRunnerProcessConfig(
            jobs=jobs_config,
            security=config.security,
            log=config.log,
            child=child,
            grace_period_s=config.listen.grace_period_s,
        )
        webhooks = WebhookProcessConfig(
            jobs=jobs_config,
            webhooks=config.webhooks,
            log=config.log,
            child=child,
            grace_period_s=config.listen.grace_period_s,
            model_name=served_model_name(config.engine.model),
        )
        # The ready fd differs per start: it is appended when the child is spawned.
        skip = frozenset({"ready_fd"})
        planned = [Child("engine-core", options.to_argv(core, skip=skip), env)]
        planned += [
            Child("frontend", options.to_argv(frontend, skip=skip), env)
            for _ in range(config.api_server_count)
        ]
        if self.http_port >= 0:
            http = HttpProcessConfig(
                listen=config.listen,
                http=dataclasses.replace(config.http, http_port=self.http_port),
                jobs=jobs_config,
                security=config.security,
                log=config.log,
                child=child,
                num_fronts=num_fronts,
                reuse_port=True,
            )
            planned.append(Child("http", options.to_argv(http, skip=skip | {"port"}), env))
        planned.append(Child("jobs", options.to_argv(runner, skip=skip), env))
        planned.append(Child("webhooks", ["serve", *options.to_argv(webhooks, skip=skip)], env))
        return planned

    async def spawn(self, child: Child) -> None:
        read_fd, write_fd = os.pipe()
        child.proc = await asyncio.create_subprocess_exec(
            *twolane_command(),
            child.role,
            *child.argv,
            "--ready-fd",
            str(write_fd),
            env=child.env,
            pass_fds=(write_fd,),
            # A supervisor that is killed takes its children with it at once: frontends
            # must not hold the port, nor the job runner its jobs, for a grace period
            # nobody is waiting out. (nats-server gets SIGTERM, so it can flush.)
            preexec_fn=death_signal_hook(signal.SIGKILL),
        )
        os.close(write_fd)
        child._ready_read_fd = read_fd
        child.started_s = time.monotonic()
        child.ready = False
        log.info("child started", role=child.role, pid=child.proc.pid)

    async def wait_ready(self, child: Child) -> bool:
        """True once the child says it is ready; False if it exits first."""
        fd = child._ready_read_fd
        try:
            line = await asyncio.to_thread(os.read, fd, 64)
        finally:
            os.close(fd)
            child._ready_read_fd = -1
        child.ready = line.startswith(b"ready")
        return child.ready

    async def start_all(self) -> None:
        """Start every child at once, then wait for each to be ready, in plan order.

        The processes around the engine core wait for its answer themselves, so they
        import and connect to NATS while it loads its model: a restarted worker serves
        that much sooner.

        Raises:
            OSError: a child exited before it was ready (its log says why).
        """
        self.children = self.plan()
        for child in self.children:
            if self.stopping:
                return
            await self.spawn(child)
        for child in self.children:
            if self.stopping:
                return
            if not await self.wait_ready(child):
                code = await child.proc.wait() if child.proc else None
                if self.stopping:
                    # stop() may have set it during the awaits; mypy keeps the narrowing
                    # from the check above.
                    return  # type: ignore[unreachable]
                raise OSError(f"{child.role} exited with {code} while starting; see its log above")
            log.info("child ready", role=child.role, pid=child.pid)

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart children that die, until `stop` is set."""
        while not stop.is_set():
            waits = {
                asyncio.ensure_future(child.proc.wait()): child
                for child in self.children
                if child.proc is not None
            }
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({*waits, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            if stopping in done:
                return
            stopping.cancel()
            for task in done:
                if task in waits:
                    await self.restart(waits[task], stop)

    async def restart(self, child: Child, stop: asyncio.Event) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        _mark_dead(self.metrics_dir, child.proc.pid)
        if time.monotonic() - child.started_s > STABLE_AFTER_S:
            child.restart_delay_s = FIRST_RESTART_DELAY_S
        log.error(
            "child died; restarting",
            role=child.role,
            pid=child.proc.pid,
            returncode=code,
            restart_in_s=child.restart_delay_s,
        )
        child.ready = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), child.restart_delay_s)
        if stop.is_set():
            return
        child.restart_delay_s = min(MAX_RESTART_DELAY_S, child.restart_delay_s * 2)
        child.num_restarts += 1
        await self.spawn(child)
        task = asyncio.ensure_future(self._log_ready(child))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _log_ready(self, child: Child) -> None:
        if await self.wait_ready(child):
            log.info("child ready", role=child.role, pid=child.pid, restarts=child.num_restarts)

    async def stop_all(self) -> None:
        """Stop the children in the reverse of their start order, each group in parallel."""
        self.stopping = True
        for role in ("frontend", "http", "jobs", "webhooks", "engine-core"):
            group = [c for c in self.children if c.role == role and c.proc is not None]
            await asyncio.gather(*(_terminate(c, self.config.listen.grace_period_s) for c in group))

    def is_ready(self) -> bool:
        return bool(self.children) and all(_is_up(c) for c in self.children)

    def is_serving(self) -> bool:
        """Whether interactive calls can be served: the engine core and a frontend are up."""
        up = {c.role for c in self.children if _is_up(c) and not self.stopping}
        return {"engine-core", "frontend"} <= up


def _is_up(child: Child) -> bool:
    return child.ready and child.proc is not None and child.proc.returncode is None


async def _terminate(child: Child, grace_period_s: float) -> None:
    proc = child.proc
    assert proc is not None
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_period_s + STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("child did not stop; killing it", role=child.role, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    log.info("child stopped", role=child.role, pid=proc.pid, returncode=proc.returncode)


def _mark_dead(metrics_dir: Path, pid: int) -> None:
    """Drop a dead child's live gauges from the scrape (its counters stay counted)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(metrics_dir))


def twolane_command() -> list[str]:
    """How to start `twolane` again: the script beside this interpreter, if it is there."""
    script = Path(sys.executable).with_name("twolane")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "twolane.services.cli"]


def reserve_port(host: str, port: int) -> tuple[int, socket.socket]:
    """Check that nobody holds `host:port` and hold it for this server's frontends.

    A plain bind fails if any socket holds the port, even one that allows sharing
    (gRPC servers set SO_REUSEPORT by default, so two of them would silently split the
    connections). The port is then held by a bound, not listening, socket with
    SO_REUSEPORT, which only this server's frontends join.

    Raises:
        OSError: the port is in use, or the host is not an address of this machine.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR, as every server sets it: connections of an earlier server still
        # in TIME_WAIT do not hold the port; a socket listening on it does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        chosen = int(probe.getsockname()[1])
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((host, chosen))
    except OSError as exc:
        holder.close()
        raise OSError(f"cannot listen on {host}:{chosen}: {exc.strerror}") from exc
    return chosen, holder


async def start_nats(
    stack: contextlib.AsyncExitStack, config: ServeConfig, stop: asyncio.Event
) -> tuple[str, str]:
    """The NATS URL and the credentials file the children connect with.

    With auth on and the embedded nats-server, NATS runs with users too: one for the
    services, one per tenant of the keys file, limited to its own results. The keys file
    is watched: a new tenant's user is added and nats-server reloads its configuration.
    """
    jobs_config = config.jobs
    if jobs_config.nats_url or not config.security.auth_on:
        return await jobs.start_nats(stack, jobs_config), jobs_config.nats_creds
    data_dir = Path(jobs_config.data_dir)
    keys = KeyStore(Path(config.security.api_keys))
    tenants = set(keys.tenants())
    server_config, creds = nats_auth.prepare(data_dir, tenants)
    embedded = EmbeddedNats(data_dir, config_file=server_config)
    url = await embedded.start()
    stack.push_async_callback(embedded.stop)

    async def follow_tenants() -> None:
        nonlocal tenants
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TENANT_WATCH_S)
            now = set(keys.tenants())
            if now != tenants:
                nats_auth.prepare(data_dir, now)
                embedded.reload()
                log.info("nats users reloaded", tenants=sorted(now))
                tenants = now

    watcher = asyncio.ensure_future(follow_tenants())
    stack.callback(watcher.cancel)
    return url, str(creds)


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop the children in order."""
    stop = stop_event()
    async with contextlib.AsyncExitStack() as stack:
        # Ports first: a port that is taken fails before anything starts.
        port, holder = reserve_port(config.listen.host, config.listen.port)
        stack.callback(holder.close)
        http_port = -1
        if config.http.http_port >= 0:
            http_port, http_holder = reserve_port(config.listen.host, config.http.http_port)
            stack.callback(http_holder.close)
        metrics_dir = Path(tempfile.mkdtemp(prefix="twolane-metrics-"))
        stack.callback(shutil.rmtree, metrics_dir, True)
        supervisor: Supervisor | None = None
        nats_availability = Availability()

        def ready() -> bool:
            return supervisor is not None and supervisor.is_ready() and nats_availability.available

        if config.metrics_port >= 0:
            metrics = MetricsServer(
                config.listen.host,
                config.metrics_port,
                multiprocess_registry(str(metrics_dir)),
                ready,
            )
            metrics.start()
            stack.callback(metrics.stop)
            log.info(
                "metrics",
                url=f"http://{config.listen.host}:{metrics.port}/metrics",
                metrics_port=metrics.port,
            )
        nats_url, nats_creds = await start_nats(stack, config, stop)
        # Fail fast on a NATS that does not answer, before a model loads for minutes; then
        # watch it, for /readyz.
        connecting = jobs.connect(
            stack, nats_url, "twolane-serve", nats_creds, availability=nats_availability
        )
        nc = await unless_stopped(connecting, stop)
        ipc_dir = Path(tempfile.mkdtemp(prefix="twolane-ipc-"))
        stack.callback(shutil.rmtree, ipc_dir, True)
        supervisor = Supervisor(config, nats_url, nats_creds, ipc_dir, port, metrics_dir, http_port)
        announcer: WorkerAnnouncer | None = None
        if isinstance(config, WorkerConfig):
            address = advertised_address(config.cluster, config.listen.host, port)
            announcer = await announce_worker(
                stack,
                nc,
                config.cluster,
                address,
                ipc_dir,
                supervisor.is_serving,
                num_replicas=config.jobs.nats_replicas,
            )
        stack.push_async_callback(supervisor.stop_all)
        if announcer is not None:
            # First of all on the way out: no gateway sends new calls to a draining worker.
            stack.push_async_callback(announcer.drain)
        starting = asyncio.ensure_future(supervisor.start_all())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # Stopped while starting (a model can take minutes to load).
            supervisor.stopping = True
            await supervisor.stop_all()
            with contextlib.suppress(OSError):
                await starting
            return
        stopping.cancel()
        starting.result()  # raises OSError when a child could not start
        if announcer is not None:
            announcer.wake()
        log.info(
            "serving",
            port=port,
            http_port=http_port if http_port >= 0 else None,
            nats_url=nats_url,
            processes=len(supervisor.children),
        )
        await supervisor.watch(stop)
        log.info("stopping")
    log.info("stopped")
