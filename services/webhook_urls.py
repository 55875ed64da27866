"""Which webhook URLs twolane POSTs to: the SSRF rules, checked at submit and at connect.

A URL must be https (http only with `--webhook-allow-http`), with a host, and every
address its host resolves to must be globally routable: loopback, private (RFC 1918,
fc00::/7), link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10),
CGNAT (100.64.0.0/10), multicast, unspecified and other reserved addresses are refused,
also when they hide inside an IPv6 address (IPv4-mapped, NAT64, 6to4), unless
`--webhook-allow-private` is given or the host is on `--webhook-allow-hosts`.

The same check runs twice: when a job is submitted (so a bad URL is the submitter's
INVALID_ARGUMENT) and when the deliverer connects, since a name can resolve to something
else by then (DNS rebinding). The deliverer resolves once, checks every address, and
connects to a checked one (webhook_transport.py).

Test hook: when TWOLANE_WEBHOOK_HOSTS_FILE names a file of `ADDRESS NAME...` lines,
names resolve from that file alone and no DNS query is ever made, so that tests can make
a name resolve to loopback or to a private address (and change it between submit and
delivery). It is for tests only; a name missing from the file does not resolve.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx

from twolane.services.config import WebhookConfig

HOSTS_FILE_ENV = "TWOLANE_WEBHOOK_HOSTS_FILE"
MAX_URL_CHARS = 2048
RESOLVE_TIMEOUT_S = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedUrlError(ValueError):
    """The URL may not be called; the message says why, without the resolved addresses
    (a submitter must not learn what internal names resolve to)."""


class UnresolvableHostError(RefusedUrlError):
    """The URL's host does not resolve (or resolving it timed out)."""


def address_problem(address: IPAddress) -> str | None:
    """What kind of non-public address `address` is, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        elif address.sixtofour is not None:
            address = address.sixtofour
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _CGNAT:
        return "a CGNAT (shared) address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


def parse_url(url: str, allow_http: bool) -> httpx.URL:
    """The URL as the deliverer will send to it (one parser for checking and sending).

    Raises:
        RefusedUrlError: not an absolute https (or allowed http) URL with a host.
    """
    if len(url) > MAX_URL_CHARS:
        raise RefusedUrlError(f"longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise RefusedUrlError(f"not a valid URL ({exc})") from exc
    if parsed.scheme not in ("https", "http"):
        raise RefusedUrlError("the scheme must be https")
    if parsed.scheme == "http" and not allow_http:
        raise RefusedUrlError("http is refused: use https (or start with --webhook-allow-http)")
    if not parsed.raw_host:
        raise RefusedUrlError("the URL has no host")
    return parsed


def host_of(url: httpx.URL) -> str:
    """The host as it is resolved and connected to (IDNA-encoded, lower case)."""
    return url.raw_host.decode("ascii").lower()


def origin_of(url: str) -> str:
    """`scheme://host:port` of a URL, the only part of it that goes into logs and
    metrics: paths and queries often carry the receiver's secrets."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "invalid-url"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    host = host_of(parsed)
    host = f"[{host}]" if ":" in host else host
    return f"{parsed.scheme}://{host}:{port}"


async def resolve(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S) -> list[IPAddress]:
    """Every address of `host`, in the resolver's order (an address resolves to itself).

    Raises:
        UnresolvableHostError: no address (or the lookup timed out).
    """
    literal = _ip_literal(host)
    if literal is not None:
        return [literal]
    hosts_file = os.environ.get(HOSTS_FILE_ENV)
    if hosts_file:
        found = _read_hosts_file(Path(hosts_file)).get(host.lower(), [])
        if not found:
            raise UnresolvableHostError(f"host {host} does not resolve")
        return found
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise UnresolvableHostError(f"host {host} does not resolve") from exc
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnresolvableHostError(f"host {host} does not resolve")
    return addresses


@dataclass(frozen=True)
class UrlPolicy:
    """The SSRF rules of one server, from its `--webhook-*` flags."""

    allow_http: bool = False
    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: WebhookConfig) -> UrlPolicy:
        return cls(config.allow_http, config.allow_private, config.hosts)

    def may_be_private(self, host: str) -> bool:
        if self.allow_private:
            return True
        host = host.lower()
        return any(
            host == entry or (entry.startswith("*.") and host.endswith(entry[1:]))
            for entry in self.allow_hosts
        )

    async def check(self, url: str) -> httpx.URL:
        """Check a URL at submit time: its form, then every address its host has now.

        Raises:
            RefusedUrlError: why the URL is refused.
        """
        parsed = parse_url(url, self.allow_http)
        await self.addresses(host_of(parsed), parsed.port or 443)
        return parsed

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """Resolve `host` once and return its addresses, all of them checked.

        Raises:
            RefusedUrlError: the host does not resolve, or one of its addresses is not
                public and the host may not be private.
        """
        addresses = await resolve(host, port)
        if self.may_be_private(host):
            return addresses
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                raise RefusedUrlError(
                    f"host {host} resolves to {problem}; refused (allow it with "
                    "--webhook-allow-private or --webhook-allow-hosts)"
                )
        return addresses


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _read_hosts_file(path: Path) -> dict[str, list[IPAddress]]:
    """`ADDRESS NAME [NAME...]` lines, `#` comments; read on every lookup, so a test can
    change what a name resolves to while servers run."""
    table: dict[str, list[IPAddress]] = {}
    try:
        text = path.read_text()
    except OSError:
        return table
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        address = _ip_literal(fields[0])
        if address is None:
            continue
        for name in fields[1:]:
            table.setdefault(name.lower(), []).append(address)
    return table
