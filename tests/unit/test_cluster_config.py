"""Worker options: the address gateways reach a worker at, heartbeat and TTL, replicas."""

from __future__ import annotations

import socket

import msgspec
import pytest

from twolane.services import jetstream
from twolane.services.config import ClusterConfig, JobsConfig, WorkerConfig, split_host_port
from twolane.services.membership import (
    WorkerRecord,
    advertised_address,
    bucket_config,
    decode_record,
    worker_key,
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.7", ("10.0.0.7", None)),
        ("10.0.0.7:50051", ("10.0.0.7", 50051)),
        ("worker-3.internal:7000", ("worker-3.internal", 7000)),
        ("[fd00::7]", ("[fd00::7]", None)),
        ("[fd00::7]:50051", ("[fd00::7]", 50051)),
    ],
)
def test_host_and_port_are_read_from_an_address(
    address: str, expected: tuple[str, int | None]
) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["fd00::7", "host:port", ":50051", "host:0", "[fd00::7]x"])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(address)


def test_the_advertised_address_completes_what_is_given() -> None:
    default = ClusterConfig()
    assert advertised_address(default, "127.0.0.1", 5000) == "127.0.0.1:5000"
    assert advertised_address(default, "0.0.0.0", 5000) == f"{socket.gethostname()}:5000"
    assert advertised_address(default, "::1", 5000) == "[::1]:5000"
    named = ClusterConfig(advertise_address="10.0.0.7")
    assert advertised_address(named, "0.0.0.0", 5000) == "10.0.0.7:5000"
    routed = ClusterConfig(advertise_address="lb.internal:443")
    assert advertised_address(routed, "0.0.0.0", 5000) == "lb.internal:443"


def test_a_ttl_shorter_than_two_heartbeats_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        ClusterConfig(heartbeat_interval_s=1.0, worker_ttl_s=1.5)
    with pytest.raises(ValueError, match="positive"):
        ClusterConfig(heartbeat_interval_s=0.0)


def test_a_worker_needs_a_shared_nats() -> None:
    with pytest.raises(ValueError, match="nats-url"):
        WorkerConfig()
    assert WorkerConfig(jobs=JobsConfig(nats_url="nats://n1:4222")).cluster.worker_ttl_s == 5.0


def test_worker_keys_are_valid_kv_keys_and_records_round_trip() -> None:
    assert worker_key("[fd00::7]:50051") == "_fd00__7__50051"
    assert worker_key("10.0.0.7:50051") == "10.0.0.7_50051"
    record = WorkerRecord(address="10.0.0.7:50051", worker_id="w", state="serving", block_size=16)
    assert decode_record(msgspec.json.encode(record)) == record


def test_nats_replicas_reach_every_stream_and_bucket() -> None:
    config = JobsConfig(nats_replicas=3)
    layout = [
        *jetstream.streams(config),
        jetstream.bucket("twolane_jobs", 60.0, "jobs", config.nats_replicas),
        bucket_config(5.0, config.nats_replicas),
    ]
    assert [s.num_replicas for s in layout] == [3] * len(layout)
    assert [s.num_replicas for s in jetstream.streams(JobsConfig())] == [1, 1, 1]


@pytest.mark.parametrize("num_replicas", [0, 6])
def test_nats_replicas_out_of_range_are_refused(num_replicas: int) -> None:
    with pytest.raises(ValueError, match="nats_replicas"):
        JobsConfig(nats_replicas=num_replicas)
