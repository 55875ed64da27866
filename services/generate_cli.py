"""`twolane generate` and `twolane chat`: talk to a running server from the terminal."""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import json_format

from twolane.client import Client, Message, Sampling, TwolaneError
from twolane.client.errors import from_rpc_error
from twolane.services.channel import Connection, add_connection_args

CHAT_HELP = "a conversation: type a message, Enter sends it; /reset starts over, Ctrl-D quits"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def sampling_of(args: argparse.Namespace) -> Sampling:
    """The sampling flags as the client's keyword arguments (top_p and seed only when
    given: unset, the server's defaults apply)."""
    sampling = Sampling(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, stop=args.stop
    )
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.seed is not None:
        sampling["seed"] = args.seed
    return sampling


def _opening(args: argparse.Namespace) -> list[Message]:
    return [("system", args.system)] if args.system else []


def _client(args: argparse.Namespace) -> Client:
    """A client of the server the flags name, with --timeout as each call's deadline.

    Raises:
        ValueError: the TLS flags do not go together.
    """
    return Client(Connection.from_args(args).client_config(args.timeout))


def generate_main(args: argparse.Namespace) -> int:
    sampling = sampling_of(args)
    messages: list[Message] | None = None
    if args.chat or args.system:
        messages = [*_opening(args), ("user", args.prompt)]
    prompt = None if messages is not None else args.prompt
    try:
        client = _client(args)
    except ValueError as exc:
        print(f"twolane generate: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            if args.stream and not args.json:
                with client.stream(prompt, messages=messages, **sampling) as stream:
                    for text in stream:
                        sys.stdout.write(text)
                        sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                reply = client.generate(prompt, messages=messages, **sampling)
                print(json_format.MessageToJson(reply) if args.json else reply.text)
        except TwolaneError as error:
            print(describe_error(error), file=sys.stderr)
            return 1
    return 0


def chat_main(args: argparse.Namespace) -> int:
    """A REPL that keeps the conversation and streams each reply."""
    sampling = sampling_of(args)
    history = _opening(args)
    print(f"# {CHAT_HELP}", file=sys.stderr)
    try:
        client = _client(args)
    except ValueError as exc:
        print(f"twolane chat: {exc}", file=sys.stderr)
        return 2
    with client:
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
            history.append(("user", line))
            reply: list[str] = []
            try:
                with client.stream(messages=history, **sampling) as stream:
                    for text in stream:
                        reply.append(text)
                        sys.stdout.write(text)
                        sys.stdout.flush()
            except TwolaneError as error:
                history.pop()
                print(f"\n{describe_error(error)}", file=sys.stderr)
                continue
            except KeyboardInterrupt:
                print("\n(interrupted)", file=sys.stderr)
            sys.stdout.write("\n")
            history.append(("assistant", "".join(reply)))


def describe_error(error: TwolaneError | grpc.RpcError) -> str:
    """The status code, message and any field violations, for people."""
    if not isinstance(error, TwolaneError):
        error = from_rpc_error(error)
    lines = [f"error: {error.code.name}: {error.message}"]
    lines += [f"  {v.field}: {v.description}" for v in error.field_violations]
    return "\n".join(lines)
