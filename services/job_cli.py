"""`twolane submit | result | cancel | watch | batch`: the batch lane from the command line.

`submit`, `result`, `cancel` and `batch` call the server through `twolane.client` (its
deadlines, retries, idempotency keys and errors); `watch` reads the completion event
from NATS itself, so it needs no gRPC server. `batch` reads OpenAI Batch API style
JSONL (one request per line with a `custom_id`) and writes one result per line,
matched by `custom_id`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from google.protobuf import json_format
from tqdm import tqdm

from twolane.client import BatchItem, BatchProgress, Client, Sampling, TwolaneError
from twolane.client.requests import TIERS
from twolane.services import jetstream
from twolane.services.channel import Connection, add_connection_args
from twolane.services.config import default_data_dir, env_default
from twolane.services.generate_cli import describe_error
from twolane.services.jobs import NATS_CONNECT_TIMEOUT_S, connect
from twolane.services.nats_embedded import read_url_file
from twolane.v1 import generate_pb2, jobs_pb2

R = TypeVar("R")
RPC_TIMEOUT_S = 30.0

# Jobs of a `twolane batch` unfinished at once, unless --concurrency says otherwise.
BATCH_CONCURRENCY = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser("submit", help="queue a job and print its id")
    submit.add_argument("prompt")
    _add_sampling(submit)
    submit.add_argument("--tier", choices=tuple(TIERS), default="standard")
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument("--custom-id", default="")
    submit.add_argument("--deadline", type=float, default=None, help="seconds from now")
    _add_target(submit)
    submit.set_defaults(func=submit_main)

    result = subparsers.add_parser("result", help="print a job's state and result as JSON")
    result.add_argument("job_id")
    _add_target(result)
    result.set_defaults(func=result_main)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    _add_target(cancel)
    cancel.set_defaults(func=cancel_main)

    watch = subparsers.add_parser(
        "watch", help="wait for a job's completion event on NATS and print it as JSON"
    )
    watch.add_argument("job_id")
    watch.add_argument("--tenant", default=jetstream.DEFAULT_TENANT)
    watch.add_argument(
        "--nats-url",
        default=env_default("TWOLANE_NATS_URL", ""),
        help="NATS URL; unset, the one `twolane serve` wrote to --data-dir (env TWOLANE_NATS_URL)",
    )
    watch.add_argument("--data-dir", default=env_default("TWOLANE_DATA_DIR", default_data_dir()))
    watch.add_argument(
        "--nats-creds",
        default=env_default("TWOLANE_NATS_CREDS", ""),
        help="file with a NATS user and password, one per line (twolane nats-creds)",
    )
    watch.add_argument("--timeout", type=float, default=None, help="give up after this many s")
    watch.set_defaults(func=watch_main)

    batch = subparsers.add_parser(
        "batch", help="run a JSONL file of requests as jobs and write their results"
    )
    batch.add_argument("input", type=Path, help="JSONL, one request per line with a custom_id")
    batch.add_argument("-o", "--output", type=Path, required=True, help="JSONL results")
    batch.add_argument("--tier", choices=tuple(TIERS), default="bulk")
    batch.add_argument("--max-tokens", type=int, default=64, help="for lines that set none")
    batch.add_argument(
        "--concurrency",
        type=int,
        default=BATCH_CONCURRENCY,
        help="most jobs submitted and not yet finished at once",
    )
    _add_target(batch)
    batch.set_defaults(func=batch_main)


def _add_target(parser: argparse.ArgumentParser) -> None:
    add_connection_args(parser)


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--seed", type=int, default=None)
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


def watch_main(args: argparse.Namespace) -> int:
    url = args.nats_url or read_url_file(Path(args.data_dir))
    if not url:
        print(
            "twolane watch: no NATS URL: pass --nats-url, or start `twolane serve` "
            f"with the data dir {args.data_dir}",
            file=sys.stderr,
        )
        return 2
    try:
        event = asyncio.run(watch(url, args.tenant, args.job_id, args.timeout, args.nats_creds))
    except (OSError, nats.errors.Error) as exc:
        hint = (
            ""
            if args.nats_url
            else f" (the URL {args.data_dir}/nats.url names; is `twolane serve` running?)"
        )
        print(f"twolane watch: {exc}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if event is None:
        print(f"twolane watch: no event for job {args.job_id} in time", file=sys.stderr)
        return 1
    print(_to_json(event))
    return 0 if event.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


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


class BatchInputError(ValueError):
    pass


def batch_main(args: argparse.Namespace) -> int:
    try:
        lines = args.input.read_text().splitlines()
        requests = list(parse_batch(lines, TIERS[args.tier], args.max_tokens))
    except (OSError, BatchInputError) as exc:
        print(f"twolane batch: {exc}", file=sys.stderr)
        return 2
    # The same file resubmitted reuses its jobs instead of running them again.
    batch_key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    for custom_id, request in requests:
        request.idempotency_key = f"batch-{batch_key}-{custom_id}"
    try:
        # Polling, not completion events: a command run by hand may not reach (or be
        # allowed on) the server's NATS, and a poll with backoff needs nothing more.
        config = Connection.from_args(args).client_config(RPC_TIMEOUT_S, wait_on_events=False)
        with Client(config) as client:
            rows = run_batch(client, requests, args.concurrency)
    except ValueError as exc:
        print(f"twolane batch: {exc}", file=sys.stderr)
        return 2
    with args.output.open("w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    num_failed = sum(row["error"] is not None for row in rows)
    print(
        f"{len(rows) - num_failed} of {len(rows)} requests succeeded; results in {args.output}",
        file=sys.stderr,
    )
    return 0 if num_failed == 0 else 1


def parse_batch(
    lines: list[str], tier: jobs_pb2.JobTier.ValueType, default_max_tokens: int
) -> Iterator[tuple[str, jobs_pb2.SubmitJobRequest]]:
    """OpenAI Batch lines ({"custom_id", "body": {"prompt", ...}}) or flat ones."""
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchInputError(f"line {number}: not JSON ({exc})") from exc
        custom_id = str(row.get("custom_id", ""))
        if not custom_id:
            raise BatchInputError(f"line {number}: custom_id is missing")
        if custom_id in seen:
            raise BatchInputError(f"line {number}: custom_id {custom_id!r} is repeated")
        seen.add(custom_id)
        body = row.get("body", row)
        request = generate_pb2.GenerateRequest()
        if row.get("url") == "/v1/chat/completions" or "messages" in body:
            _add_messages(request, body.get("messages"), number)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise BatchInputError(f"line {number}: body.prompt must be a non-empty string")
            request.prompt = prompt
        try:
            request.params.CopyFrom(_sampling_params(body, default_max_tokens))
        except (TypeError, ValueError) as exc:
            raise BatchInputError(f"line {number}: bad sampling parameter ({exc})") from exc
        yield (
            custom_id,
            jobs_pb2.SubmitJobRequest(request=request, tier=tier, custom_id=custom_id),
        )


def _add_messages(request: generate_pb2.GenerateRequest, messages: object, number: int) -> None:
    """A chat line's `body.messages`: [{"role": ..., "content": "..."}, ...]."""
    if not isinstance(messages, list) or not messages:
        raise BatchInputError(f"line {number}: body.messages must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BatchInputError(
                f"line {number}: body.messages[{index}] needs a role and a string content"
            )
        request.messages.add(role=str(message.get("role", "")), content=message["content"])


def _sampling_params(body: dict[str, Any], default_max_tokens: int) -> generate_pb2.SamplingParams:
    params = generate_pb2.SamplingParams(
        max_tokens=int(body.get("max_tokens", default_max_tokens)),
        temperature=float(body.get("temperature", 0.0)),
    )
    if "top_p" in body:
        params.top_p = float(body["top_p"])
    if "seed" in body:
        params.seed = int(body["seed"])
    stop = body.get("stop") or []
    params.stop.extend([stop] if isinstance(stop, str) else stop)
    return params


def run_batch(
    client: Client, requests: list[tuple[str, jobs_pb2.SubmitJobRequest]], concurrency: int
) -> list[dict[str, Any]]:
    """Run every request as a job, at most `concurrency` unfinished at once; return the
    output rows in input order. A request that could not be run gets a row with its
    error (the first such error is also told on stderr)."""
    done: dict[int, BatchItem] = {}
    told = False
    with tqdm(total=len(requests), desc="jobs", unit="job") as bar:

        def progress(_: BatchProgress) -> None:
            bar.update(1)

        inputs = [request for _, request in requests]
        for item in client.batch(inputs, concurrency=concurrency, on_progress=progress):
            if item.error is not None and not told:
                bar.write(f"twolane batch: {describe_error(item.error)}", file=sys.stderr)
                told = True
            done[item.index] = item
    return [batch_row(custom_id, done[index]) for index, (custom_id, _) in enumerate(requests)]


def batch_row(custom_id: str, item: BatchItem) -> dict[str, Any]:
    """One output line, shaped like an OpenAI Batch API result."""
    result = item.result
    if result is None:
        assert item.error is not None
        return {
            "id": item.job_id or None,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": item.error.code.name.lower(), "message": item.error.message},
        }
    if result.state != jobs_pb2.JOB_STATE_SUCCEEDED or not result.HasField("result"):
        state = jobs_pb2.JobState.Name(result.state).removeprefix("JOB_STATE_").lower()
        return {
            "id": result.job_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": state, "message": result.error or state},
        }
    generated = result.result
    return {
        "id": result.job_id,
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "body": {
                "text": generated.text,
                "token_ids": list(generated.token_ids),
                "finish_reason": generate_pb2.FinishReason.Name(generated.finish_reason)
                .removeprefix("FINISH_REASON_")
                .lower(),
                "usage": {
                    "prompt_tokens": generated.usage.prompt_tokens,
                    "completion_tokens": generated.usage.completion_tokens,
                    "total_tokens": generated.usage.prompt_tokens
                    + generated.usage.completion_tokens,
                },
            },
        },
        "error": None,
    }
