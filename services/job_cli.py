"""`twolane submit | result | cancel | watch | batch`: the batch lane from the command line.

`batch` reads an OpenAI Batch API input file (one request per line with a
`custom_id`, completions or chat), checks every line before it submits any, and
writes the output and error files in the Batch API's format. It waits on the jobs'
completion events (NATS), and a line run before on the same model with the same
parameters reuses its result.
`submit`, `result` and `cancel` call the server through `twolane.client` (its
deadlines, retries, idempotency keys and errors); `watch` reads the completion event
from NATS itself, so it needs no gRPC server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import nats
import nats.errors
import nats.js.errors
from google.protobuf import json_format
from tqdm import tqdm

from twolane.client import Client, Sampling, TwolaneError
from twolane.client.requests import TIERS
from twolane.services import jetstream
from twolane.services.batch_lines import BadLine, GoodLine, parse_lines
from twolane.services.channel import Connection, add_connection_args
from twolane.services.config import default_data_dir, env_default
from twolane.services.generate_cli import describe_error
from twolane.services.jobs import NATS_CONNECT_TIMEOUT_S, connect
from twolane.services.nats_embedded import read_url_file
from twolane.services.openai_format import (
    Reply,
    batch_refused_line,
    batch_result_line,
    batch_unrun_line,
    error_body,
    response_body,
)
from twolane.services.openai_schema import CHAT_COMPLETIONS
from twolane.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2

R = TypeVar("R")
RPC_TIMEOUT_S = 30.0

FINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCEEDED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED,
    }
)
MAX_CONCURRENT_CALLS = 32
QUEUE_FULL_RETRY_S = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    submit = subparsers.add_parser(
        "submit", help="queue a job and print its id", formatter_class=formatter
    )
    submit.add_argument("prompt", help="the prompt text")
    _add_sampling(submit)
    submit.add_argument("--tier", choices=tuple(TIERS), default="standard", help="job tier")
    submit.add_argument(
        "--idempotency-key", default="", help="the same key again returns the same job"
    )
    submit.add_argument("--custom-id", default="", help="your own id, echoed in results")
    submit.add_argument("--deadline", type=float, default=None, help="seconds from now")
    _add_webhook_url(submit)
    _add_target(submit)
    submit.set_defaults(func=submit_main)

    result = subparsers.add_parser(
        "result", help="print a job's state and result as JSON", formatter_class=formatter
    )
    result.add_argument("job_id", help="the id submit printed")
    _add_target(result)
    result.set_defaults(func=result_main)

    cancel = subparsers.add_parser(
        "cancel", help="cancel a queued or running job", formatter_class=formatter
    )
    cancel.add_argument("job_id", help="the id submit printed")
    _add_target(cancel)
    cancel.set_defaults(func=cancel_main)

    watch = subparsers.add_parser(
        "watch",
        help="wait for a job's completion event on NATS and print it as JSON",
        formatter_class=formatter,
    )
    watch.add_argument("job_id", help="the id submit printed")
    _add_nats(watch)
    watch.add_argument("--timeout", type=float, default=None, help="give up after this many s")
    watch.set_defaults(func=watch_main)

    batch = subparsers.add_parser(
        "batch",
        help="run a JSONL file of requests as jobs and write their results",
        description="Run an OpenAI Batch API input file as jobs and write the output (and "
        "error) file in the Batch API's format. Every line is checked before any is "
        "submitted; results wait on the completion events on NATS.",
        formatter_class=formatter,
    )
    batch.add_argument("input", type=Path, help="JSONL, one request per line with a custom_id")
    batch.add_argument("-o", "--output", type=Path, required=True, help="JSONL results")
    batch.add_argument(
        "--errors",
        type=Path,
        default=None,
        help="JSONL of the requests that failed (default: OUTPUT with .errors.jsonl)",
    )
    batch.add_argument("--tier", choices=tuple(TIERS), default="bulk", help="job tier")
    batch.add_argument("--max-tokens", type=int, default=64, help="for lines that set none")
    batch.add_argument(
        "--timeout", type=float, default=None, help="give up waiting after this many s"
    )
    _add_webhook_url(batch)
    _add_target(batch)
    _add_nats(batch)
    batch.set_defaults(func=batch_main)


def _add_webhook_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--webhook-url",
        default="",
        help="POST each job's completion event here, signed (see `twolane webhooks secret`)",
    )


def _add_nats(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", default=jetstream.DEFAULT_TENANT, help="the jobs' tenant")
    parser.add_argument(
        "--nats-url",
        default=env_default("TWOLANE_NATS_URL", ""),
        help="NATS URL; unset, the one `twolane serve` wrote to --data-dir (env TWOLANE_NATS_URL)",
    )
    parser.add_argument(
        "--data-dir",
        default=env_default("TWOLANE_DATA_DIR", default_data_dir()),
        help="the server's data dir, where it writes nats.url (env TWOLANE_DATA_DIR)",
    )
    parser.add_argument(
        "--nats-creds",
        default=env_default("TWOLANE_NATS_CREDS", ""),
        help="file with a NATS user and password, one per line (twolane nats-creds)",
    )


def _add_target(parser: argparse.ArgumentParser) -> None:
    add_connection_args(parser)


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


# ---- submit, result, cancel ---------------------------------------------------------


def submit_main(args: argparse.Namespace) -> int:
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop)
    if args.seed is not None:
        sampling["seed"] = args.seed
    response = _call(
        args,
        lambda client: client.submit(
            args.prompt,
            tier=args.tier,
            idempotency_key=args.idempotency_key or None,
            custom_id=args.custom_id,
            job_deadline_s=args.deadline,
            webhook_url=args.webhook_url,
            **sampling,
        ),
    )
    if response is None:
        return 1
    print(response.job_id)
    return 0


def result_main(args: argparse.Namespace) -> int:
    response = _call(args, lambda client: client.result(args.job_id))
    if response is None:
        return 1
    print(_to_json(response))
    return 0


def cancel_main(args: argparse.Namespace) -> int:
    response = _call(args, lambda client: client.cancel(args.job_id))
    if response is None:
        return 1
    print(_to_json(response))
    return 0


def _call(args: argparse.Namespace, call: Callable[[Client], R]) -> R | None:
    """One call through a client of its own; on failure, say why on stderr and return
    None."""
    try:
        client = Client(Connection.from_args(args).client_config(RPC_TIMEOUT_S))
    except ValueError as exc:
        print(f"twolane {args.command}: {exc}", file=sys.stderr)
        return None
    with client:
        try:
            return call(client)
        except TwolaneError as error:
            print(describe_error(error), file=sys.stderr)
            return None


def _to_json(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message), ensure_ascii=False)


# ---- watch --------------------------------------------------------------------------


def nats_url(args: argparse.Namespace, command: str) -> str | None:
    """The NATS URL given, or the one the server wrote; None (said on stderr) if neither."""
    url = args.nats_url or read_url_file(Path(args.data_dir))
    if not url:
        print(
            f"twolane {command}: no NATS URL: pass --nats-url, or --data-dir with the data "
            f"dir of the `twolane serve` to use (not {args.data_dir})",
            file=sys.stderr,
        )
    return url or None


def watch_main(args: argparse.Namespace) -> int:
    url = nats_url(args, "watch")
    if url is None:
        return 2
    try:
        event = asyncio.run(watch(url, args.tenant, args.job_id, args.timeout, args.nats_creds))
    except (OSError, nats.errors.Error) as exc:
        print(f"twolane watch: {exc}{_nats_hint(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if event is None:
        print(f"twolane watch: no event for job {args.job_id} in time", file=sys.stderr)
        return 1
    print(_to_json(event))
    return 0 if event.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


def _nats_hint(args: argparse.Namespace) -> str:
    if args.nats_url:
        return ""
    return f" (the URL {args.data_dir}/nats.url names; is `twolane serve` running?)"


async def watch(
    url: str, tenant: str, job_id: str, timeout_s: float | None, creds: str = ""
) -> jobs_pb2.JobEvent | None:
    """The job's completion event: the stored one if it is out, else the next one.

    Raises:
        OSError: NATS cannot be reached (within `timeout_s`, at most NATS_CONNECT_TIMEOUT_S).
    """
    subject = jetstream.result_subject(tenant, job_id)
    connect_s = min(timeout_s or NATS_CONNECT_TIMEOUT_S, NATS_CONNECT_TIMEOUT_S)
    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(stack, url, "twolane-watch", creds, timeout_s=connect_s)
        return await _wait_for_event(nc, subject, timeout_s)


async def _wait_for_event(
    nc: nats.aio.client.Client, subject: str, timeout_s: float | None
) -> jobs_pb2.JobEvent | None:
    # Subscribe before looking back, so an event published in between is not missed.
    sub = await nc.subscribe(subject, max_msgs=1)
    try:
        stored = await nc.jetstream().get_last_msg(jetstream.RESULTS_STREAM, subject)
        return jobs_pb2.JobEvent.FromString(stored.data)
    except nats.js.errors.NotFoundError:
        pass
    try:
        msg = await sub.next_msg(timeout=timeout_s or 365 * 24 * 3600.0)
    except nats.errors.TimeoutError:
        return None
    return jobs_pb2.JobEvent.FromString(msg.data)


# ---- batch --------------------------------------------------------------------------


def batch_main(args: argparse.Namespace) -> int:
    try:
        text = args.input.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"twolane batch: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    lines = parse_lines(text, default_max_tokens=args.max_tokens, flat=True)
    bad = [line for line in lines if isinstance(line, BadLine)]
    for line in bad:
        print(f"twolane batch: {line.describe()}", file=sys.stderr)
    if bad:
        print(
            f"twolane batch: {len(bad)} of {len(lines)} lines are bad; nothing was submitted",
            file=sys.stderr,
        )
        return 2
    if not lines:
        print(f"twolane batch: {args.input} has no requests", file=sys.stderr)
        return 2
    url = args.nats_url or read_url_file(Path(args.data_dir)) or None
    if url is None:
        print(
            "twolane batch: no NATS URL (--nats-url, or --data-dir of the server): waiting "
            "for the jobs by polling GetResult",
            file=sys.stderr,
        )
    good = [line for line in lines if isinstance(line, GoodLine)]
    errors_path = args.errors or args.output.with_suffix(".errors.jsonl")
    try:
        outcome = asyncio.run(run_batch(args, url, good))
    except grpc.aio.AioRpcError as err:
        print(describe_error(err), file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"twolane batch: {exc}", file=sys.stderr)
        return 1
    except (OSError, nats.errors.Error) as exc:
        print(f"twolane batch: {exc}{_nats_hint(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    _write_jsonl(args.output, outcome.results)
    if outcome.errors:
        _write_jsonl(errors_path, outcome.errors)
    else:
        errors_path.unlink(missing_ok=True)  # an earlier run's
    for message in outcome.refused:
        print(f"twolane batch: {message}", file=sys.stderr)
    where = f"results in {args.output}" + (f", errors in {errors_path}" if outcome.errors else "")
    print(
        f"{len(outcome.results)} of {len(good)} requests succeeded "
        f"({outcome.num_reused} reused from an earlier run of the same lines on the same "
        f"model); {where}",
        file=sys.stderr,
    )
    return 0 if not outcome.errors else 1


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def idempotency_key(model: str, tier: str, line: GoodLine) -> str:
    """The same request (model, tier, custom_id, prompt and every parameter) gets the
    same key, so only it reuses an earlier result; any change runs it again."""
    digest = hashlib.sha256()
    for part in (model, tier, line.custom_id, line.endpoint):
        digest.update(part.encode() + b"\0")
    digest.update(line.request.SerializeToString(deterministic=True))
    return "batch-" + digest.hexdigest()[:32]


POLL_FIRST_PAUSE_S = 0.2
POLL_MAX_PAUSE_S = 2.0


@dataclass
class BatchOutcome:
    results: list[dict[str, Any]] = field(default_factory=list)  # the output file's lines
    errors: list[dict[str, Any]] = field(default_factory=list)  # the error file's
    refused: list[str] = field(default_factory=list)  # lines the server refused, described
    num_reused: int = 0


async def run_batch(
    args: argparse.Namespace, url: str | None, lines: list[GoodLine]
) -> BatchOutcome:
    """Submit every line, wait for every job's completion event (or, without a NATS URL,
    poll GetResult), and return the file lines."""
    events: dict[str, jobs_pb2.JobEvent] = {}
    arrived = asyncio.Event()

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        event = jobs_pb2.JobEvent.FromString(msg.data)
        if event.state in FINAL_STATES:
            events[event.job_id] = event
            arrived.set()

    async with contextlib.AsyncExitStack() as stack:
        nc = None
        if url is not None:
            nc = await connect(stack, url, "twolane-batch", args.nats_creds)
            # Subscribed before submitting, so no event is missed.
            await nc.subscribe(jetstream.result_subject(args.tenant, "*"), cb=on_event)
        async with Connection.from_args(args).aio_channel() as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stats = await stub.GetStats(inference_pb2.GetStatsRequest(), timeout=RPC_TIMEOUT_S)
            outcome = BatchOutcome()
            submitted = await _submit_all(
                stub, stats.model_name, args.tier, lines, outcome, args.webhook_url
            )
            if nc is None:
                await _poll_results(stub, args, submitted, events)
        if nc is not None:
            await _wait_for_events(nc, args, submitted, events, arrived)
    for line, job_id in submitted:
        outcome_line(outcome, line, events[job_id], stats.model_name)
    return outcome


async def _submit_all(
    stub: inference_pb2_grpc.InferenceServiceStub,
    model: str,
    tier: str,
    lines: list[GoodLine],
    outcome: BatchOutcome,
    webhook_url: str = "",
) -> list[tuple[GoodLine, str]]:
    limit = asyncio.Semaphore(MAX_CONCURRENT_CALLS)

    async def submit(line: GoodLine) -> tuple[GoodLine, str] | None:
        request = jobs_pb2.SubmitJobRequest(
            request=line.request,
            tier=TIERS[tier],
            custom_id=line.custom_id,
            idempotency_key=idempotency_key(model, tier, line),
            webhook_url=webhook_url,
        )
        async with limit:
            while True:
                try:
                    response = await stub.SubmitJob(request, timeout=RPC_TIMEOUT_S)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(QUEUE_FULL_RETRY_S)  # the queue is full: wait
                        continue
                    if err.code() is not grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                    refusal = describe_error(err).replace("\n", ";")
                    outcome.refused.append(
                        f"line {line.number} (custom_id {line.custom_id!r}): {refusal}"
                    )
                    outcome.errors.append(
                        batch_refused_line(
                            line.custom_id,
                            f"line-{line.number}",
                            400,
                            error_body(
                                f"line {line.number}: {err.details()}", "invalid_request_error"
                            ),
                        )
                    )
                    return None
        outcome.num_reused += response.deduplicated
        return line, response.job_id

    submitted = await asyncio.gather(*(submit(line) for line in lines))
    return [pair for pair in submitted if pair is not None]


async def _wait_for_events(
    nc: nats.aio.client.Client,
    args: argparse.Namespace,
    submitted: list[tuple[GoodLine, str]],
    events: dict[str, jobs_pb2.JobEvent],
    arrived: asyncio.Event,
) -> None:
    """Until every job's event is in: those published before we subscribed (reused
    jobs) are read from the results stream, the others arrive on the subscription."""
    js = nc.jetstream()
    for _, job_id in submitted:
        if job_id in events:
            continue
        subject = jetstream.result_subject(args.tenant, job_id)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            stored = await js.get_last_msg(jetstream.RESULTS_STREAM, subject)
            events.setdefault(job_id, jobs_pb2.JobEvent.FromString(stored.data))
    job_ids = {job_id for _, job_id in submitted}
    give_up_at = None if args.timeout is None else time.monotonic() + args.timeout
    with tqdm(total=len(job_ids), desc="jobs", unit="job") as progress:
        while True:
            arrived.clear()
            done = len(job_ids & events.keys())
            progress.update(done - progress.n)
            if done == len(job_ids):
                return
            remaining_s = None if give_up_at is None else give_up_at - time.monotonic()
            if remaining_s is not None and remaining_s <= 0:
                raise TimeoutError(f"{len(job_ids) - done} jobs did not finish in {args.timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), remaining_s)


async def _poll_results(
    stub: inference_pb2_grpc.InferenceServiceStub,
    args: argparse.Namespace,
    submitted: list[tuple[GoodLine, str]],
    events: dict[str, jobs_pb2.JobEvent],
) -> None:
    """Without NATS: GetResult each unfinished job, pausing longer while none finishes."""
    pending = {job_id for _, job_id in submitted}
    give_up_at = None if args.timeout is None else time.monotonic() + args.timeout
    pause_s = POLL_FIRST_PAUSE_S
    with tqdm(total=len(pending), desc="jobs", unit="job") as progress:
        while pending:
            finished = 0
            for job_id in sorted(pending):
                reply = await stub.GetResult(
                    jobs_pb2.GetResultRequest(job_id=job_id), timeout=RPC_TIMEOUT_S
                )
                if reply.state in FINAL_STATES:
                    event = jobs_pb2.JobEvent(
                        job_id=job_id,
                        state=reply.state,
                        error=reply.error,
                        custom_id=reply.custom_id,
                        finished_at=reply.finished_at,
                    )
                    if reply.HasField("result"):
                        event.result.CopyFrom(reply.result)
                    events[job_id] = event
                    pending.discard(job_id)
                    finished += 1
            progress.update(finished)
            if not pending:
                return
            if give_up_at is not None and time.monotonic() > give_up_at:
                raise TimeoutError(f"{len(pending)} jobs did not finish in {args.timeout} s")
            pause_s = POLL_FIRST_PAUSE_S if finished else min(2 * pause_s, POLL_MAX_PAUSE_S)
            await asyncio.sleep(pause_s)


def outcome_line(
    outcome: BatchOutcome, line: GoodLine, event: jobs_pb2.JobEvent, model: str
) -> None:
    """The job's line in the output file (or, when it did not succeed, the error file)."""
    job_id = event.job_id
    if event.state == jobs_pb2.JOB_STATE_SUCCEEDED and event.HasField("result"):
        reply = Reply(
            id=("chatcmpl-" if line.endpoint == CHAT_COMPLETIONS else "cmpl-") + job_id,
            endpoint=line.endpoint,
            model=model or "twolane",
            created=int(event.finished_at.seconds or time.time()),
            logprobs=line.request.params.logprobs,
            return_token_ids=line.return_token_ids,
        )
        body = response_body(reply, [event.result], None)
        outcome.results.append(batch_result_line(line.custom_id, job_id, body))
    elif event.state == jobs_pb2.JOB_STATE_FAILED:
        body = error_body(event.error or "the job failed", "server_error")
        outcome.errors.append(batch_refused_line(line.custom_id, job_id, 500, body))
    else:
        state = jobs_pb2.JobState.Name(event.state).removeprefix("JOB_STATE_").lower()
        message = event.error or f"the job was {state}"
        outcome.errors.append(batch_unrun_line(line.custom_id, job_id, f"job_{state}", message))
