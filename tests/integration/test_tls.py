"""TLS and mutual TLS on the gRPC port, with certificates made here by `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twolane.client import Client, ClientConfig, RetryPolicy, Unavailable
from twolane.v1 import generate_pb2, inference_pb2_grpc

from .serving import start_server

REQUEST = generate_pb2.GenerateRequest(
    prompt="hi", params=generate_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
)


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    folder: Path,
    stem: str,
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    is_ca: bool = False,
) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer[0].subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    pem = Pem(folder / f"{stem}.crt", folder / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem, cert, key


@dataclass(frozen=True)
class Certificates:
    ca: Pem
    server: Pem
    client: Pem


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(folder, "ca", "twolane test CA", None, is_ca=True)
    server, _, _ = _issue(folder, "server", "localhost", (ca_cert, ca_key))
    client, _, _ = _issue(folder, "client", "a client", (ca_cert, ca_key))
    return Certificates(ca, server, client)


async def generate(channel: grpc.aio.Channel) -> generate_pb2.GenerateResponse:
    return await inference_pb2_grpc.InferenceServiceStub(channel).Generate(REQUEST, timeout=10)


def trusting(certs: Certificates, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def test_tls_only_a_client_trusting_the_ca_gets_in(certs: Certificates) -> None:
    server = start_server("--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key))
    try:
        async with grpc.aio.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(plain)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(server.address, trusting(certs)) as secure:
            assert len((await generate(secure)).token_ids) == 2
    finally:
        server.stop()


async def test_mutual_tls_refuses_a_client_without_a_certificate(certs: Certificates) -> None:
    server = start_server(
        "--tls-cert",
        str(certs.server.cert),
        "--tls-key",
        str(certs.server.key),
        "--tls-client-ca",
        str(certs.ca.cert),
    )
    try:
        async with grpc.aio.secure_channel(server.address, trusting(certs)) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(anonymous)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        credentials = trusting(certs, certs.client)
        async with grpc.aio.secure_channel(server.address, credentials) as known:
            assert len((await generate(known)).token_ids) == 2
    finally:
        server.stop()


def test_the_python_client_speaks_mutual_tls(certs: Certificates) -> None:
    server = start_server(
        "--tls-cert",
        str(certs.server.cert),
        "--tls-key",
        str(certs.server.key),
        "--tls-client-ca",
        str(certs.ca.cert),
    )
    config = ClientConfig(
        targets=(server.address,),
        tls_ca=str(certs.ca.cert),
        tls_cert=str(certs.client.cert),
        tls_key=str(certs.client.key),
        retry=RetryPolicy(max_attempts=1),
    )
    try:
        with Client(config) as client:
            assert len(client.generate("hi", max_tokens=2, ignore_eos=True).token_ids) == 2
        anonymous = config.replace(tls_cert="", tls_key="")
        with Client(anonymous) as client, pytest.raises(Unavailable):
            client.generate("hi", max_tokens=2)
    finally:
        server.stop()
