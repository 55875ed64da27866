"""How the CLI commands reach a server: address, API key and TLS, from flags or env.

The commands that call the API do it through `twolane.client` (`client_config`), so
they retry, time out and report errors as every other caller of the client does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from twolane.client import ClientConfig
from twolane.services.config import DEFAULT_PORT, env_default


@dataclass(frozen=True)
class Connection:
    target: str
    api_key: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Connection:
        return cls(args.target, args.api_key, args.tls_ca, args.tls_cert, args.tls_key)

    def client_config(self, deadline_s: float | None, **changes: Any) -> ClientConfig:
        """The configuration of a `twolane.client` client for this server.

        Raises:
            ValueError: the TLS files do not go together (a key without a certificate).
        """
        return ClientConfig(
            targets=(self.target,),
            api_key=self.api_key,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            deadline_s=deadline_s,
            **changes,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )

    def channel(self) -> grpc.Channel:
        credentials = self.credentials()
        channel = (
            grpc.secure_channel(self.target, credentials)
            if credentials is not None
            else grpc.insecure_channel(self.target)
        )
        if self.metadata:
            channel = grpc.intercept_channel(channel, _Metadata(self.metadata))
        return channel

    def aio_channel(self) -> grpc.aio.Channel:
        credentials = self.credentials()
        interceptors = [_AioMetadata(self.metadata)] if self.metadata else None
        if credentials is not None:
            return grpc.aio.secure_channel(self.target, credentials, interceptors=interceptors)
        return grpc.aio.insecure_channel(self.target, interceptors=interceptors)


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--target",
        default=env_default("TWOLANE_TARGET", f"127.0.0.1:{DEFAULT_PORT}"),
        help="server address HOST:PORT (env TWOLANE_TARGET)",
    )
    add(
        "--api-key",
        default=env_default("TWOLANE_API_KEY", ""),
        help="API key, for a server run with --api-keys (env TWOLANE_API_KEY)",
    )
    add("--tls-ca", default=env_default("TWOLANE_TLS_CA", ""), help="PEM CA to trust (TLS)")
    add(
        "--tls-cert",
        default=env_default("TWOLANE_TLS_CERT", ""),
        help="PEM client certificate (mutual TLS)",
    )
    add("--tls-key", default=env_default("TWOLANE_TLS_KEY", ""), help="PEM key of --tls-cert")


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_ClientCallDetails.of(details, self._metadata), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_ClientCallDetails.of(details, self._metadata), request)


class _AioMetadata(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_AioCallDetails.of(details, self._metadata), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_AioCallDetails.of(details, self._metadata), request)


@dataclass(frozen=True)
class _ClientCallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any

    @classmethod
    def of(cls, details: Any, metadata: tuple[tuple[str, str], ...]) -> _ClientCallDetails:
        return cls(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )


class _AioCallDetails:
    @staticmethod
    def of(details: grpc.aio.ClientCallDetails, metadata: tuple[tuple[str, str], ...]) -> Any:
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=grpc.aio.Metadata(*(details.metadata or ()), *metadata),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )
