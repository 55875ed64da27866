"""Fuzzing the public API: over 10,000 requests, never INTERNAL or UNKNOWN, nothing broken.

Requests come from hypothesis strategies built from the protobuf descriptors (every
field of every RPC's request, see proto_strategies.py), then raw and damaged wire bytes
and oversized messages, sixteen at a time on a real channel to a real server. Before and
after, a greedy reference request must get the same tokens, and the server must have
lost no process and hold no KV block once idle.

At the short size of `make test` each RPC gets a twentieth of the soak's examples
(about 500 requests); `make test-reliability` runs them all. The run's seed is printed;
`TWOLANE_FUZZ_SEED=N make test-reliability` replays it (and hypothesis keeps the failing
examples it found in .hypothesis/).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, currently_in_test_context, given, note, seed, settings
from hypothesis import strategies as st
from integration.serving import ServerProcess

from twolane.services.handlers import INFERENCE_SERVICE
from twolane.v1 import generate_pb2, inference_pb2, inference_pb2_grpc

from . import proto_strategies
from .conftest import SOAK, Report

FUZZ_SEED = int(os.environ.get("TWOLANE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
BATCH = 16
# Examples per RPC, each a batch of BATCH requests: 10,400 requests in all with the
# wire-level ones below (GetStatsRequest has no fields: hypothesis stops after one).
SOAK_EXAMPLES = {
    "Generate": 180,
    "GenerateStream": 100,
    "SubmitJob": 100,
    "GetResult": 60,
    "CancelJob": 60,
    "GetStats": 20,
}
SOAK_WIRE_EXAMPLES = 150
SHORT_SHARE = 20  # make test runs one example in this many
EXAMPLES = {name: n if SOAK else max(2, n // SHORT_SHARE) for name, n in SOAK_EXAMPLES.items()}
WIRE_EXAMPLES = SOAK_WIRE_EXAMPLES if SOAK else SOAK_WIRE_EXAMPLES // SHORT_SHARE
MIN_CASES = 10_000
FORBIDDEN = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
}
CALL_TIMEOUT_S = 60.0
METHODS = {method.name: method for method in INFERENCE_SERVICE.methods}
REFERENCE = generate_pb2.GenerateRequest(
    prompt_token_ids=[10, 20, 30, 40],
    params=generate_pb2.SamplingParams(max_tokens=16, ignore_eos=True),
)

_state: dict[str, object] = {}
_outcomes: Counter[str] = Counter()


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
    )


@pytest.fixture(scope="module")
def channel(shared_server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(shared_server.address, options=options) as channel:
        yield channel


def raw_callable(channel: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    path = f"/{INFERENCE_SERVICE.full_name}/{name}"
    if METHODS[name].server_streaming:
        return channel.unary_stream(path, request_serializer=None, response_deserializer=None)
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)


def send(channel: grpc.Channel, name: str, bodies: list[bytes]) -> list[grpc.StatusCode]:
    """Send every body at once; each one's status code."""
    call = raw_callable(channel, name)
    if METHODS[name].server_streaming:
        streams = [call(body, timeout=CALL_TIMEOUT_S) for body in bodies]
        codes = []
        for stream in streams:
            try:
                for _ in stream:
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        return codes
    futures = [call.future(body, timeout=CALL_TIMEOUT_S) for body in bodies]
    codes = []
    for future in futures:
        error = future.exception()
        codes.append(grpc.StatusCode.OK if error is None else error.code())
    return codes


def check(name: str, bodies: list[bytes], codes: list[grpc.StatusCode]) -> None:
    if currently_in_test_context():  # the oversized messages are sent outside hypothesis
        note(f"TWOLANE_FUZZ_SEED={FUZZ_SEED}")
    _outcomes.update(f"{name}:{code.name}" for code in codes)
    _outcomes["cases"] += len(codes)
    for body, code in zip(bodies, codes, strict=True):
        assert code not in FORBIDDEN, f"{name} got {code.name} for {body[:200]!r}"


def test_the_reference_request_before(channel: grpc.Channel) -> None:
    print(f"fuzz seed: TWOLANE_FUZZ_SEED={FUZZ_SEED}")
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    _state["reference"] = list(stub.Generate(REFERENCE, timeout=CALL_TIMEOUT_S).token_ids)


def message_test(name: str) -> object:
    """The fuzz test of one RPC."""
    request_type = METHODS[name].input_type

    @seed(FUZZ_SEED)
    @fuzz_settings(EXAMPLES[name])
    @given(batch=st.lists(proto_strategies.messages(request_type), min_size=BATCH, max_size=BATCH))
    def test(channel: grpc.Channel, batch: list) -> None:
        bodies = [message.SerializeToString() for message in batch]
        check(name, bodies, send(channel, name, bodies))

    test.__name__ = f"test_fuzz_{name}"
    test.__doc__ = f"{name} with schema-driven requests: no forbidden status."
    return test


test_fuzz_generate = message_test("Generate")
test_fuzz_generate_stream = message_test("GenerateStream")
test_fuzz_submit_job = message_test("SubmitJob")
test_fuzz_get_result = message_test("GetResult")
test_fuzz_cancel_job = message_test("CancelJob")
test_fuzz_get_stats = message_test("GetStats")


@st.composite
def wire_batch(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    name = draw(st.sampled_from(sorted(METHODS)))
    bodies = draw(
        st.lists(proto_strategies.damaged(METHODS[name].input_type), min_size=BATCH, max_size=BATCH)
    )
    return name, bodies


@seed(FUZZ_SEED)
@fuzz_settings(WIRE_EXAMPLES)
@given(batch=wire_batch())
def test_fuzz_damaged_wire_bytes(channel: grpc.Channel, batch: tuple[str, list[bytes]]) -> None:
    """Truncated, flipped, spliced and random bytes: a precise status or a real answer."""
    name, bodies = batch
    check(name, bodies, send(channel, name, bodies))


def test_oversized_messages_are_refused(channel: grpc.Channel) -> None:
    """Past the 4 MiB limit gRPC refuses with RESOURCE_EXHAUSTED; just under it, the
    validator refuses without tokenizing."""
    huge = "y" * (5 << 20)
    under = "y" * ((4 << 20) - 1024)
    bodies = {
        "Generate": [
            generate_pb2.GenerateRequest(prompt=huge),
            generate_pb2.GenerateRequest(prompt=under),
        ],
        "GenerateStream": [generate_pb2.GenerateStreamRequest(prompt=under)],
    }
    for name, messages in bodies.items():
        payloads = [m.SerializeToString() for m in messages]
        codes = send(channel, name, payloads)
        check(name, payloads, codes)
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    long_ids = [generate_pb2.GenerateRequest(prompt_token_ids=[7] * 900_000).SerializeToString()]
    codes = send(channel, "Generate", long_ids)
    check("Generate", long_ids, codes)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT]


def test_the_server_is_whole_after_the_fuzz(
    channel: grpc.Channel, shared_server: ServerProcess, report: Report
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    assert shared_server.proc.poll() is None
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE.full_name))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    if "reference" in _state:
        after = list(stub.Generate(REFERENCE, timeout=CALL_TIMEOUT_S).token_ids)
        assert after == _state["reference"]
    assert "child died" not in shared_server.log_text()
    give_up_at = time.monotonic() + 120  # fuzzed jobs may still be running
    while True:
        stats = stub.GetStats(inference_pb2.GetStatsRequest())
        if stats.num_running == stats.num_waiting == stats.num_used_blocks == 0:
            break
        assert time.monotonic() < give_up_at, stats
        time.sleep(0.2)
    num_cases = _outcomes["cases"]
    print(f"fuzz seed {FUZZ_SEED}: {num_cases} cases, outcomes {dict(_outcomes)}")
    report.record(
        "fuzz",
        seed=FUZZ_SEED,
        cases=num_cases,
        internal=sum(n for k, n in _outcomes.items() if k.endswith(":INTERNAL")),
        unknown=sum(n for k, n in _outcomes.items() if k.endswith(":UNKNOWN")),
        ok=sum(n for k, n in _outcomes.items() if k.endswith(":OK")),
        invalid_argument=sum(n for k, n in _outcomes.items() if k.endswith(":INVALID_ARGUMENT")),
    )
    ran_everything = all(f"{name}:" in " ".join(_outcomes) for name in EXAMPLES)
    if ran_everything and SOAK:
        assert num_cases >= MIN_CASES
