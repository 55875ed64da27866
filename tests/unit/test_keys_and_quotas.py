"""The keys file (hashes only, private, reloaded) and per-tenant quotas."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from twolane.services import keys as keys_module
from twolane.services.errors import RateLimitedError
from twolane.services.keys import KeysFile, KeyStore, Limits, Principal
from twolane.services.quotas import TenantQuotas

TWOLANE = str(Path(sys.executable).with_name("twolane"))


def test_the_file_keeps_only_a_hash_of_each_key_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, record = KeysFile(path).create("acme", Limits(requests_per_minute=5))
    assert key.startswith("tl_") and len(key) > 40
    text = path.read_text()
    assert key not in text and key[3:] not in text
    assert json.loads(text)["keys"][0]["sha256"] == keys_module.key_hash(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert record.key_id in text


def test_a_store_accepts_a_key_until_it_is_revoked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "keys.json"
    key, record = KeysFile(path).create("acme", Limits(max_concurrent=2))
    store = KeyStore(path)
    principal = store.authenticate(key)
    assert principal == Principal("acme", record.key_id, Limits(max_concurrent=2))
    for bad in (None, "", "Bearer", "tl_short", "x" * 46, keys_module.new_key()):
        assert store.authenticate(bad) is None
    KeysFile(path).revoke(record.key_id)
    assert store.authenticate(key) is None
    assert store.tenants() == {}


def test_a_new_key_is_taken_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "keys.json"
    KeysFile(path).create("first", Limits())
    store = KeyStore(path)
    key, _ = KeysFile(path).create("second", Limits())
    assert store.authenticate(key) is not None
    assert set(store.tenants()) == {"first", "second"}


def test_a_broken_file_keeps_the_keys_already_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys_module, "RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "keys.json"
    key, _ = KeysFile(path).create("acme", Limits())
    store = KeyStore(path)
    path.write_text("{ not json")
    assert store.authenticate(key) is not None


@pytest.mark.parametrize("tenant", ["", "Acme", "a.b", "a b", "-x", "x" * 64])
def test_tenant_names_are_one_plain_subject_token(tmp_path: Path, tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        KeysFile(tmp_path / "keys.json").create(tenant, Limits())


def test_the_cli_prints_only_the_key_and_lists_without_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = subprocess.run(
        [TWOLANE, "keys", "create", "--tenant", "acme", "--keys-file", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip()
    assert created.stdout == key + "\n" and key.startswith("tl_")
    listing = subprocess.run(
        [TWOLANE, "keys", "list", "--keys-file", str(path)], capture_output=True, text=True
    ).stdout
    assert "acme" in listing and key not in listing
    key_id = KeysFile(path).read()[0].key_id
    revoked = subprocess.run(
        [TWOLANE, "keys", "revoke", key_id, "--keys-file", str(path)], capture_output=True
    )
    assert revoked.returncode == 0 and KeysFile(path).read()[0].revoked


def principal(**limits: int) -> Principal:
    return Principal("acme", "k1", Limits(**limits))


def test_over_the_request_rate_says_when_to_retry() -> None:
    quotas = TenantQuotas()
    for _ in range(3):
        quotas.admit(principal(requests_per_minute=3), 10)
    with pytest.raises(RateLimitedError) as info:
        quotas.admit(principal(requests_per_minute=3), 10)
    assert 0 < info.value.retry_after_s <= 20.0  # one request refills in 60 / 3 s


def test_unused_tokens_are_given_back_when_a_request_finishes() -> None:
    quotas = TenantQuotas()
    limits = principal(tokens_per_minute=100)
    reservation = quotas.admit(limits, 90)
    with pytest.raises(RateLimitedError):
        quotas.admit(limits, 20)
    reservation.settle(30)  # it used 30 of its 90
    quotas.admit(limits, 60)


def test_a_request_larger_than_the_token_rate_can_never_run() -> None:
    with pytest.raises(RateLimitedError, match="needs 500 tokens"):
        TenantQuotas().admit(principal(tokens_per_minute=100), 500)


def test_concurrency_counts_what_the_core_holds_and_what_was_just_sent() -> None:
    held = {"acme": 1}
    quotas = TenantQuotas(held_by_core=lambda tenant: held.get(tenant, 0))
    first = quotas.admit(principal(max_concurrent=2), 1)
    with pytest.raises(RateLimitedError, match="2 concurrent"):
        quotas.admit(principal(max_concurrent=2), 1)  # 1 held + 1 sent, not yet seen
    first.started()
    held["acme"] = 1  # the core finished one and holds the new one
    quotas.admit(principal(max_concurrent=2), 1)


def test_several_fronts_split_a_rate_limit() -> None:
    quotas = TenantQuotas(share=0.5)
    for _ in range(5):
        quotas.admit(principal(requests_per_minute=10), 1)
    with pytest.raises(RateLimitedError):
        quotas.admit(principal(requests_per_minute=10), 1)
