"""`twolane submit | result | cancel | watch | batch`: the batch lane from the command line.

`batch` reads an OpenAI Batch API input file (one request per line with a
`custom_id`, completions or chat), checks every line before it submits any, and
writes the output and error files in the Batch API's format. It waits on the jobs'
completion events (NATS), and a line run before on the same model with the same
parameters reuses its result.
Every command goes through `twolane.client` (its deadlines, retries, idempotency
keys, waiting and errors), so the CLI and the client cannot drift; `watch` reads the
completion event from NATS alone (`Client.watch`), so it needs no gRPC server.
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

from google.protobuf import json_format
from tqdm import tqdm

from twolane.client import (
    AsyncClient,
    Client,
    ClientConfig,
    EventsUnreachable,
    InvalidArgument,
    RateLimited,
    Sampling,
    TwolaneError,
    WaitTimeout,
)
from twolane.client.requests import TIERS
from twolane.services import jetstream
from twolane.services.batch_lines import BadLine, GoodLine, parse_lines
from twolane.services.channel import Connection, add_connection_args
from twolane.services.config import default_data_dir, env_default
from twolane.services.generate_cli import describe_error
from twolane.services.jobs import NATS_CONNECT_TIMEOUT_S
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
from twolane.v1 import jobs_pb2

R = TypeVar("R")
RPC_TIMEOUT_S = 30.0

MAX_CONCURRENT_CALLS = 32
MAX_CONCURRENT_WAITS = 256
QUEUE_FULL_RETRY_S = 1.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    parser.add_argument(
        "--tenant",
        default="",
        help="the jobs' tenant (default: the one --nats-creds names, else "
        f"{jetstream.DEFAULT_TENANT})",
    )
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


def events_config(args: argparse.Namespace, url: str | None) -> dict[str, Any]:
    """The client's NATS settings from the command line (no URL: it polls GetResult)."""
    connect_s = min(args.timeout or NATS_CONNECT_TIMEOUT_S, NATS_CONNECT_TIMEOUT_S)
    return {
        "nats_url": url or "",
        "nats_creds": args.nats_creds,
        "data_dir": args.data_dir,
        "tenant": args.tenant,
        "nats_connect_timeout_s": connect_s,
        "wait_on_events": url is not None,
    }


def watch_main(args: argparse.Namespace) -> int:
    url = nats_url(args, "watch")
    if url is None:
        return 2
    try:
        with Client(ClientConfig(**events_config(args, url))) as client:
            event = client.watch(args.job_id, args.timeout)
    except EventsUnreachable as exc:
        print(f"twolane watch: {exc.message}{_nats_hint(args)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # the credentials file
        print(f"twolane watch: {exc}", file=sys.stderr)
        return 2
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
        config = Connection.from_args(args).client_config(RPC_TIMEOUT_S, **events_config(args, url))
        outcome = asyncio.run(run_batch(config, args, good))
    except TwolaneError as error:
        print(describe_error(error), file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"twolane batch: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # TLS or credentials files
        print(f"twolane batch: {exc}", file=sys.stderr)
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


@dataclass
class BatchOutcome:
    results: list[dict[str, Any]] = field(default_factory=list)  # the output file's lines
    errors: list[dict[str, Any]] = field(default_factory=list)  # the error file's
    refused: list[str] = field(default_factory=list)  # lines the server refused, described
    num_reused: int = 0


async def run_batch(
    config: ClientConfig, args: argparse.Namespace, lines: list[GoodLine]
) -> BatchOutcome:
    """Submit every line, wait for every job (on its completion event, or by polling
    GetResult without NATS: `AsyncClient.wait` does either), and return the file lines."""
    async with AsyncClient(config) as client:
        model = (await client.get_stats()).model_name
        outcome = BatchOutcome()
        submitted = await _submit_all(client, model, args.tier, lines, outcome, args.webhook_url)
        results = await _wait_all(client, [job_id for _, job_id in submitted], args.timeout)
    for line, job_id in submitted:
        outcome_line(outcome, line, results[job_id], model)
    return outcome


async def _submit_all(
    client: AsyncClient,
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
                    response = await client.submit(request)
                    break
                except RateLimited as error:
                    # The queue (or the tenant's quota) stayed full through the client's
                    # retries: a batch waits for room as long as it takes.
                    await asyncio.sleep(error.retry_after_s or QUEUE_FULL_RETRY_S)
                except InvalidArgument as error:
                    refusal = describe_error(error).replace("\n", ";")
                    outcome.refused.append(
                        f"line {line.number} (custom_id {line.custom_id!r}): {refusal}"
                    )
                    outcome.errors.append(
                        batch_refused_line(
                            line.custom_id,
                            f"line-{line.number}",
                            400,
                            error_body(
                                f"line {line.number}: {error.message}", "invalid_request_error"
                            ),
                        )
                    )
                    return None
        outcome.num_reused += response.deduplicated
        return line, response.job_id

    submitted = await asyncio.gather(*(submit(line) for line in lines))
    return [pair for pair in submitted if pair is not None]


async def _wait_all(
    client: AsyncClient, job_ids: list[str], timeout_s: float | None
) -> dict[str, jobs_pb2.GetResultResponse]:
    """Every job's final result; TimeoutError when some had none after `timeout_s`."""
    results: dict[str, jobs_pb2.GetResultResponse] = {}
    give_up_at = None if timeout_s is None else time.monotonic() + timeout_s
    # A bound on waits at once keeps the GetResult calls they make bounded too; jobs
    # finish roughly in order, so a wait that starts late mostly finds its job done.
    limit = asyncio.Semaphore(MAX_CONCURRENT_WAITS)
    with tqdm(total=len(job_ids), desc="jobs", unit="job") as progress:

        async def wait(job_id: str) -> None:
            async with limit:
                remaining_s = None if give_up_at is None else give_up_at - time.monotonic()
                with contextlib.suppress(WaitTimeout):
                    results[job_id] = await client.wait(job_id, remaining_s)
                    progress.update(1)

        await asyncio.gather(*(wait(job_id) for job_id in dict.fromkeys(job_ids)))
    num_unfinished = len(set(job_ids) - results.keys())
    if num_unfinished:
        raise TimeoutError(f"{num_unfinished} jobs did not finish in {timeout_s} s")
    return results


def outcome_line(
    outcome: BatchOutcome, line: GoodLine, result: jobs_pb2.GetResultResponse, model: str
) -> None:
    """The job's line in the output file (or, when it did not succeed, the error file)."""
    job_id = result.job_id
    if result.state == jobs_pb2.JOB_STATE_SUCCEEDED and result.HasField("result"):
        reply = Reply(
            id=("chatcmpl-" if line.endpoint == CHAT_COMPLETIONS else "cmpl-") + job_id,
            endpoint=line.endpoint,
            model=model or "twolane",
            created=int(result.finished_at.seconds or time.time()),
            logprobs=line.request.params.logprobs,
            return_token_ids=line.return_token_ids,
        )
        body = response_body(reply, [result.result], None)
        outcome.results.append(batch_result_line(line.custom_id, job_id, body))
    elif result.state == jobs_pb2.JOB_STATE_FAILED:
        body = error_body(result.error or "the job failed", "server_error")
        outcome.errors.append(batch_refused_line(line.custom_id, job_id, 500, body))
    else:
        state = jobs_pb2.JobState.Name(result.state).removeprefix("JOB_STATE_").lower()
        message = result.error or f"the job was {state}"
        outcome.errors.append(batch_unrun_line(line.custom_id, job_id, f"job_{state}", message))
