"""`twolane generate` and `twolane chat`: talk to a running server from the terminal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from twolane.services.channel import Connection, add_connection_args
from twolane.v1 import generate_pb2, inference_pb2_grpc

CHAT_HELP = "a conversation: type a message, Enter sends it; /reset starts over, Ctrl-D quits"


def register(subparsers: argparse._SubParsersAction) -> None:
    generate = subparsers.add_parser(
        "generate",
        help="generate a completion on a running server",
        description="Send one prompt (or, with --chat, one chat turn) and print the reply.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    generate.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    generate.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message of a chat"
    )
    generate.add_argument("--stream", action="store_true", help="print text as it arrives")
    generate.add_argument(
        "--json", action="store_true", help="print the whole response as JSON (ids, usage, timing)"
    )
    _add_common(generate)
    generate.set_defaults(func=generate_main)

    chat = subparsers.add_parser(
        "chat",
        help="an interactive chat with a running server, streamed",
        description=CHAT_HELP,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_common(chat)
    chat.set_defaults(func=chat_main, max_tokens=512)


def _add_common(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--system", default=None, help="a system message that opens the conversation")
    add("--max-tokens", type=int, default=64, help="most tokens to generate")
    add("--temperature", type=float, default=0.0, help="0 is greedy")
    add("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    add("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off")
    add("--seed", type=int, default=None, help="makes sampling reproducible")
    add("--stop", action="append", default=[], help="stop string (repeatable)")
    add_connection_args(parser)
    add("--timeout", type=float, default=120.0, help="deadline of each call, in seconds")


def sampling_params(args: argparse.Namespace) -> generate_pb2.SamplingParams:
    params = generate_pb2.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, stop=args.stop
    )
    if args.top_p is not None:
        params.top_p = args.top_p
    if args.seed is not None:
        params.seed = args.seed
    return params


def _opening(args: argparse.Namespace) -> list[generate_pb2.ChatMessage]:
    return [generate_pb2.ChatMessage(role="system", content=args.system)] if args.system else []


def generate_main(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    fields: dict[str, object] = {"params": params}
    if args.chat or args.system:
        fields["messages"] = [
            *_opening(args),
            generate_pb2.ChatMessage(role="user", content=args.prompt),
        ]
    else:
        fields["prompt"] = args.prompt
    with Connection.from_args(args).channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            if args.stream and not args.json:
                request = generate_pb2.GenerateStreamRequest(**fields)  # type: ignore[arg-type]
                for text in _stream_text(stub, request, args.timeout):
                    sys.stdout.write(text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                request = generate_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
                reply = stub.Generate(request, timeout=args.timeout)
                print(json_format.MessageToJson(reply) if args.json else reply.text)
        except grpc.RpcError as err:
            print(describe_error(err), file=sys.stderr)
            return 1
    return 0


def _stream_text(
    stub: inference_pb2_grpc.InferenceServiceStub,
    request: generate_pb2.GenerateStreamRequest,
    timeout_s: float,
) -> Iterator[str]:
    for chunk in stub.GenerateStream(request, timeout=timeout_s):
        yield chunk.text


def chat_main(args: argparse.Namespace) -> int:
    """A REPL that keeps the conversation and streams each reply."""
    params = sampling_params(args)
    history = _opening(args)
    print(f"# {CHAT_HELP}", file=sys.stderr)
    with Connection.from_args(args).channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not line:
                continue
            if line == "/reset":
                history = _opening(args)
                continue
            history.append(generate_pb2.ChatMessage(role="user", content=line))
            request = generate_pb2.GenerateStreamRequest(messages=history, params=params)
            reply: list[str] = []
            try:
                for text in _stream_text(stub, request, args.timeout):
                    reply.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
            except grpc.RpcError as err:
                history.pop()
                print(f"\n{describe_error(err)}", file=sys.stderr)
                continue
            except KeyboardInterrupt:
                print("\n(interrupted)", file=sys.stderr)
            sys.stdout.write("\n")
            history.append(generate_pb2.ChatMessage(role="assistant", content="".join(reply)))


def describe_error(err: grpc.RpcError) -> str:
    """The status code, message and any field violations, for people."""
    lines = [f"error: {err.code().name}: {err.details()}"]  # type: ignore[attr-defined]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            lines += [f"  {v.field}: {v.description}" for v in bad_request.field_violations]
    return "\n".join(lines)
