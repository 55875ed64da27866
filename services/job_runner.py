"""`twolane jobs`: the batch lane's consumer, a client of the engine core in its own process.

Its JetStream round trips and job bookkeeping never share an interpreter with the
processes that serve interactive calls or run the model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import structlog

from twolane.scheduler.client import EngineClient
from twolane.scheduler.config import served_model_name
from twolane.scheduler.protocol import EngineAddress
from twolane.services import jobs, options
from twolane.services.config import JobRunnerProcessConfig
from twolane.services.keys import KeyStore
from twolane.services.loop_lag import watch_loop_lag
from twolane.services.process import run_process, settle_heap, signal_ready, stop_event
from twolane.services.prompts import ModelPrompts
from twolane.services.validation import ModelLimits

log = structlog.get_logger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "jobs",
        help="(started by serve) run batch jobs from JetStream on a running engine core",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    options.add_options(parser, JobRunnerProcessConfig)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return run_process(
        "jobs", args, lambda a: options.from_args(JobRunnerProcessConfig, a), run_job_runner
    )


async def run_job_runner(config: JobRunnerProcessConfig) -> None:
    """Pull and run jobs until SIGTERM or SIGINT; then finish or give back running ones."""
    stop = stop_event()
    # Job bookkeeping yields the CPU to the processes that serve interactive calls: on a
    # machine with few cores, a burst of it would otherwise delay a first token.
    os.nice(config.jobs.niceness)
    async with contextlib.AsyncExitStack() as stack:
        engine = EngineClient(EngineAddress(Path(config.child.ipc_dir)), name="jobs")
        await engine.start()
        stack.push_async_callback(engine.close)
        info = await engine.wait_ready_unless(stop)
        if info is None:
            return
        stack.enter_context(watch_loop_lag("jobs", served_model_name(info.model)))
        prompts = ModelPrompts.from_dir(Path(info.model_dir))
        limits = ModelLimits(vocab_size=info.vocab_size, max_model_len=info.max_model_len)
        nc, store = await jobs.start_job_store(
            stack,
            config.jobs,
            jobs.model_validator(limits, prompts),
            name="twolane-jobs",
            stop=stop,
        )
        keys = KeyStore(Path(config.security.api_keys)) if config.security.auth_on else None

        def tenant_limit(tenant: str) -> int:
            limits = keys.tenants().get(tenant) if keys is not None else None
            return limits.max_concurrent if limits is not None else 0

        await jobs.start_job_worker(
            stack, nc, store, engine, prompts, config.jobs, config.grace_period_s, tenant_limit
        )
        settle_heap()
        signal_ready(config.child.ready_fd)
        await stop.wait()
        log.info("draining", grace_period_s=config.grace_period_s)
    log.info("stopped")
