"""`twolane generate`: send one prompt to a running server and print the reply."""

from __future__ import annotations

import argparse
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from twolane.services.config import DEFAULT_PORT, env_default
from twolane.v1 import generate_pb2, inference_pb2_grpc


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate a completion on a running server", description=__doc__
    )
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument(
        "--target",
        default=env_default("TWOLANE_TARGET", f"127.0.0.1:{DEFAULT_PORT}"),
        help="server address HOST:PORT (env TWOLANE_TARGET)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = generate_pb2.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        stop=args.stop,
    )
    if args.top_p is not None:
        params.top_p = args.top_p
    if args.seed is not None:
        params.seed = args.seed
    with grpc.insecure_channel(args.target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            if args.stream:
                request = generate_pb2.GenerateStreamRequest(prompt=args.prompt, params=params)
                for chunk in stub.GenerateStream(request, timeout=args.timeout):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                request = generate_pb2.GenerateRequest(prompt=args.prompt, params=params)
                print(stub.Generate(request, timeout=args.timeout).text)
        except grpc.RpcError as err:
            print(describe_error(err), file=sys.stderr)
            return 1
    return 0


def describe_error(err: grpc.RpcError) -> str:
    """The status code, message and any field violations, for people."""
    lines = [f"error: {err.code().name}: {err.details()}"]  # type: ignore[attr-defined]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            lines += [f"  {v.field}: {v.description}" for v in bad_request.field_violations]
    return "\n".join(lines)
