"""The public service's method handlers, with request decoding that cannot fail in gRPC.

The generated `add_InferenceServiceServicer_to_server` decodes each request with the
message's `FromString`; when that raises (truncated bytes, a string field that is not
UTF-8), grpc answers UNKNOWN with the exception's class in the message. These handlers
are registered the same way, one per method of the service's descriptor, but decode with
a function that returns an `Undecodable` marker instead of raising, and the handler
answers it with INVALID_ARGUMENT and a plain message.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message

from twolane.services.errors import MalformedRequestError
from twolane.services.status import to_status
from twolane.v1 import inference_pb2

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Any, None]]


@dataclass(frozen=True)
class Undecodable:
    """What a request body that is not a `message_name` message decodes to."""

    message_name: str

    @property
    def error(self) -> MalformedRequestError:
        return MalformedRequestError(
            f"the request body is not a valid {self.message_name} message "
            "(truncated, or a string field that is not UTF-8)"
        )


def add_servicer_to_server(
    servicer: object,
    server: grpc.aio.Server,
    service: descriptor.ServiceDescriptor = INFERENCE_SERVICE,
) -> None:
    """Serve `servicer`'s methods of `service`, as the generated function would."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported here")
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(behavior),
                request_deserializer=_decoder(request_type),
                response_serializer=response_type.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behavior),
                request_deserializer=_decoder(request_type),
                response_serializer=response_type.SerializeToString,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _decoder(message_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    name = message_type.DESCRIPTOR.full_name

    def decode(data: bytes) -> Message | Undecodable:
        try:
            return message_type.FromString(data)
        except Exception:  # DecodeError, or whatever else a parser may raise on bad bytes
            return Undecodable(name)

    return decode


def _unary(behavior: UnaryBehavior) -> UnaryBehavior:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await context.abort_with_status(to_status(request.error))
        return await behavior(request, context)

    return handle


def _streaming(behavior: StreamBehavior) -> StreamBehavior:
    async def handle(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[Any, None]:
        if isinstance(request, Undecodable):
            await context.abort_with_status(to_status(request.error))
        # Closed with this generator, so a client that leaves early aborts its request now.
        async with contextlib.aclosing(behavior(request, context)) as replies:
            async for reply in replies:
                yield reply

    return handle
