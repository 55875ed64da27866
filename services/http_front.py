"""`twolane http`: the OpenAI-compatible HTTP API over one engine core, in a process of its own.

Completions and chat completions go to the engine core at interactive priority, as
the gRPC frontend's calls do; files and batches live in JetStream, and the batches'
lines run as bulk-tier jobs on the durable lane (a BatchRunner here drives them).
With `--api-keys` callers authenticate with the same keys as over gRPC and are held to
the same quotas; with `--tls-cert` the port speaks HTTPS only. Starlette on uvicorn; no
torch. `twolane serve --http-port P` starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from twolane.scheduler.client import EngineClient
from twolane.scheduler.config import served_model_name
from twolane.scheduler.protocol import EngineAddress
from twolane.services import batch_store, jobs, options
from twolane.services.audit import AuditLog
from twolane.services.availability import Availability
from twolane.services.batch_api import BatchAPI
from twolane.services.batch_lines import GoodLine
from twolane.services.batch_runner import BatchRunner
from twolane.services.config import HttpProcessConfig
from twolane.services.errors import FieldViolation, InvalidArgumentError
from twolane.services.http_auth import CallScope
from twolane.services.keys import KeyStore, Limits, Principal
from twolane.services.loop_lag import watch_loop_lag
from twolane.services.openai_api import CompletionsAPI, not_found
from twolane.services.openai_format import Reply, response_body
from twolane.services.openai_schema import CHAT_COMPLETIONS
from twolane.services.process import run_process, settle_heap, signal_ready, stop_event
from twolane.services.prompts import ModelPrompts
from twolane.services.quotas import TenantQuotas
from twolane.services.validation import ModelLimits
from twolane.v1 import generate_pb2

log = structlog.get_logger(__name__)

LISTEN_BACKLOG = 2048


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "http",
        help="(started by serve) the OpenAI-compatible HTTP API over a running engine core",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    options.add_options(parser, HttpProcessConfig, skip=frozenset({"port"}))
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return run_process(
        "http", args, lambda a: options.from_args(HttpProcessConfig, a), run_http_front
    )


async def run_http_front(config: HttpProcessConfig) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight requests finish and stop."""
    stop = stop_event()
    security = config.security
    keys = KeyStore(Path(security.api_keys)) if security.auth_on else None
    async with contextlib.AsyncExitStack() as stack:
        engine = EngineClient(EngineAddress(Path(config.child.ipc_dir)), name="http")
        await engine.start()
        stack.push_async_callback(engine.close)
        info = await engine.wait_ready_unless(stop)
        if info is None:
            return
        stack.enter_context(watch_loop_lag("http", served_model_name(info.model)))
        prompts = ModelPrompts.from_dir(Path(info.model_dir))
        limits = ModelLimits(vocab_size=info.vocab_size, max_model_len=info.max_model_len)
        nats_availability = Availability()
        nc, store = await jobs.start_job_store(
            stack,
            config.jobs,
            jobs.model_validator(limits, prompts),
            name="twolane-http",
            stop=stop,
            availability=nats_availability,
            tenant_max_queued=config.jobs.tenant_max_queued_jobs if keys else None,
        )
        try:
            files, batches = await batch_store.open_stores(nc.jetstream(), config.jobs)
        except Exception as exc:
            raise OSError(f"cannot set up the Batch API's JetStream stores: {exc}") from exc
        model_name = config.http.served_model_name or served_model_name(info.model)
        quotas = TenantQuotas(1 / config.num_fronts, held_by_core=engine.held_for_tenant)
        api = CompletionsAPI(engine, prompts, model_name, quotas, nats_availability)
        audit = AuditLog(security.audit_path(config.jobs.data_dir))
        stack.callback(audit.close)

        def render(
            endpoint: str, job_id: str, result: generate_pb2.GenerateResponse, line: GoodLine
        ) -> dict[str, object]:
            reply = Reply(
                id=("chatcmpl-" if endpoint == CHAT_COMPLETIONS else "cmpl-") + job_id,
                endpoint=endpoint,
                model=model_name,
                created=int(time.time()),
                logprobs=line.request.params.logprobs,
                return_token_ids=line.return_token_ids,
            )
            return response_body(reply, [result], api.token_text)

        runner = BatchRunner(
            nc,
            batches,
            files,
            store,
            render,
            served_model=model_name,
            default_chat_max_tokens=limits.max_model_len,
            runner_id=f"{socket.gethostname()}-{os.getpid()}",
            admit=_line_admitter(keys, quotas) if keys is not None else None,
        )
        await runner.start()
        stack.push_async_callback(runner.stop)
        app = Starlette(
            routes=[*api.routes(), *BatchAPI(files, batches, runner, audit).routes()],
            exception_handlers={HTTPException: not_found},
            middleware=[Middleware(CallScope, keys=keys)],
        )
        port = await start_http_server(stack, app, config)
        settle_heap()
        signal_ready(config.child.ready_fd)
        await stop.wait()
        log.info("draining", grace_period_s=config.listen.grace_period_s, port=port)
    log.info("stopped")


def _line_admitter(keys: KeyStore, quotas: TenantQuotas) -> Callable[[str, int], None]:
    """Counts a batch line against its tenant's quotas, as SubmitJob counts a job."""

    def admit(tenant: str, num_tokens: int) -> None:
        limits = keys.tenants().get(tenant, Limits())
        per_minute = limits.tokens_per_minute * quotas.share
        if limits.tokens_per_minute and num_tokens > max(1.0, per_minute):
            # Waiting would never help: the line is refused, the rest run.
            raise InvalidArgumentError(
                [
                    FieldViolation(
                        "params.max_tokens",
                        f"the request needs {num_tokens} tokens; tenant {tenant!r} may use "
                        f"{int(per_minute)} per minute here",
                    )
                ]
            )
        quotas.admit(Principal(tenant, "batch", limits), num_tokens, concurrent=False)

    return admit


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: the process's stop event owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


async def start_http_server(
    stack: contextlib.AsyncExitStack, app: Starlette, config: HttpProcessConfig
) -> int:
    """Serve `app` on `config`'s host and HTTP port and log the `http listening` line.

    The port is shared only with `reuse_port` (the supervisor has checked it is ours).
    On exit the server stops accepting, and in-flight requests get the grace period.

    Raises:
        OSError: the address cannot be bound.
    """
    host, port = config.listen.host, config.http.http_port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if config.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound = int(sock.getsockname()[1])
    # uvicorn's own lines would say `listening`-like things in another format.
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    security = config.security
    tls: dict[str, object] = {}
    if security.tls_cert:
        tls = {"ssl_certfile": security.tls_cert, "ssl_keyfile": security.tls_key}
        if security.tls_client_ca:
            tls |= {"ssl_ca_certs": security.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            backlog=LISTEN_BACKLOG,
            # Annotated int, but only ever an asyncio.wait_for timeout (float seconds).
            timeout_graceful_shutdown=config.listen.grace_period_s,  # type: ignore[arg-type]
            **tls,  # type: ignore[arg-type]
        )
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="twolane-http-server")
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if serving.done():
        serving.result()
        raise OSError(f"the HTTP server on {host}:{bound} stopped while starting")

    async def drain() -> None:
        server.should_exit = True
        await serving

    stack.push_async_callback(drain)
    scheme = "https" if tls else "http"
    log.info("http listening", host=host, port=bound, url=f"{scheme}://{host}:{bound}/v1")
    return bound
