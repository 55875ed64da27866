"""The SSRF rules for webhook URLs: which addresses are public, and how names resolve in
tests (a hosts file, never DNS)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from twolane.services.webhook_urls import (
    HOSTS_FILE_ENV,
    RefusedUrlError,
    UnresolvableHostError,
    UrlPolicy,
    address_problem,
    origin_of,
    parse_url,
    resolve,
)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.254", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
        ("192.0.2.1", "private"),  # documentation range: not routable
        ("240.0.0.1", "private"),
    ],
)
def test_addresses_that_are_not_public_are_named(address: str, problem: str) -> None:
    found = address_problem(ipaddress.ip_address(address))
    assert found is not None and problem in found


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "1.1.1.1"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://example.com/", "http is refused"),
        ("ftp://example.com/", "scheme"),
        ("https:///path", "no host|not a valid URL"),
        ("not a url", "scheme|not a valid URL"),
        ("https://example.com/" + "a" * 3000, "longer than"),
    ],
)
def test_malformed_or_plain_http_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(RefusedUrlError, match=why):
        parse_url(url, allow_http=False)


def test_http_is_accepted_when_allowed() -> None:
    assert parse_url("http://example.com/x", allow_http=True).host == "example.com"


def test_origins_in_logs_carry_no_credentials_path_or_query() -> None:
    url = "https://user:pa55@Hooks.Example.com/secret-token/abc?key=s3cr3t"
    assert origin_of(url) == "https://hooks.example.com:443"
    assert origin_of("http://[::1]:8080/x") == "http://[::1]:8080"


@pytest.fixture
def hosts_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "hosts"
    path.write_text(
        "# test names\n"
        "93.184.215.14 public.test\n"
        "127.0.0.1 loopback.test\n"
        "93.184.215.15 mixed.test\n"
        "10.0.0.9 mixed.test\n"
    )
    monkeypatch.setenv(HOSTS_FILE_ENV, str(path))
    return path


async def test_names_resolve_from_the_hosts_file_alone(hosts_file: Path) -> None:
    assert await resolve("public.test", 443) == [ipaddress.ip_address("93.184.215.14")]
    assert await resolve("PUBLIC.test", 443) == [ipaddress.ip_address("93.184.215.14")]
    with pytest.raises(UnresolvableHostError):
        await resolve("example.com", 443)  # not in the file: no DNS fallback


async def test_every_address_of_a_name_is_checked(hosts_file: Path) -> None:
    policy = UrlPolicy()
    await policy.check("https://public.test/hook")
    with pytest.raises(RefusedUrlError, match="loopback"):
        await policy.check("https://loopback.test/hook")
    with pytest.raises(RefusedUrlError, match="private"):
        await policy.check("https://mixed.test/hook")  # one private address is enough


async def test_refusals_do_not_tell_the_submitter_what_a_name_resolves_to(
    hosts_file: Path,
) -> None:
    with pytest.raises(RefusedUrlError) as info:
        await UrlPolicy().check("https://mixed.test/hook")
    assert "10.0.0.9" not in str(info.value)


async def test_allow_private_and_allow_listed_hosts_lift_the_address_rule(
    hosts_file: Path,
) -> None:
    await UrlPolicy(allow_private=True).check("https://loopback.test/hook")
    await UrlPolicy(allow_hosts=("loopback.test",)).check("https://loopback.test/hook")
    await UrlPolicy(allow_hosts=("*.test",)).check("https://loopback.test/hook")
    await UrlPolicy(allow_hosts=("127.0.0.1",)).check("https://127.0.0.1:9/hook")
    with pytest.raises(RefusedUrlError):
        await UrlPolicy(allow_hosts=("other.test",)).check("https://loopback.test/hook")
    with pytest.raises(RefusedUrlError, match="http is refused"):
        await UrlPolicy(allow_private=True).check("http://loopback.test/hook")
