"""Field validation of generate requests, before anything reaches the engine."""

from __future__ import annotations

import math

import pytest
from google.protobuf import timestamp_pb2

from twolane.scheduler.request import SamplingParams
from twolane.services.errors import InvalidArgumentError
from twolane.services.prompts import ShapeOnly
from twolane.services.validation import ModelLimits, check_times, validate_generate
from twolane.v1 import generate_pb2, jobs_pb2

LIMITS = ModelLimits(vocab_size=258, max_model_len=64)
BYTES = ShapeOnly()  # a byte per character, as the built-in model's tokenizer


def validate(**fields: object) -> object:
    params = fields.pop("params", None)
    request = generate_pb2.GenerateRequest(**fields)
    if params is not None:
        request.params.CopyFrom(generate_pb2.SamplingParams(**params))
    return validate_generate(request, LIMITS, BYTES)


def violated_fields(**fields: object) -> list[str]:
    with pytest.raises(InvalidArgumentError) as info:
        validate(**fields)
    return [v.field for v in info.value.violations]


def test_text_prompt_becomes_its_token_ids() -> None:
    valid = validate(prompt="hi")
    assert valid.prompt_token_ids == [104, 105]


def test_unset_params_take_the_engine_defaults() -> None:
    valid = validate(prompt_token_ids=[1, 2])
    assert valid.params == SamplingParams(max_tokens=16, top_p=1.0, seed=None)


def test_set_params_are_carried_over() -> None:
    valid = validate(
        prompt="x",
        params=dict(
            max_tokens=5,
            temperature=0.7,
            top_p=0.9,
            top_k=3,
            seed=0,
            stop=["\n"],
            stop_token_ids=[7],
            logprobs=True,
        ),
    )
    assert valid.params.max_tokens == 5
    assert valid.params.top_p == pytest.approx(0.9)
    assert valid.params.top_k == 3
    assert valid.params.seed == 0  # an explicit zero seed is not "unset"
    assert valid.params.stop == ("\n",)
    assert valid.params.stop_token_ids == (7,)
    assert valid.params.logprobs


def test_empty_prompt_is_rejected() -> None:
    assert violated_fields() == ["prompt"]


def test_prompt_and_token_ids_together_are_rejected() -> None:
    assert violated_fields(prompt="a", prompt_token_ids=[1]) == ["prompt_token_ids"]


@pytest.mark.parametrize("token_id", [-1, 258, 10_000])
def test_token_ids_outside_the_vocabulary_are_rejected(token_id: int) -> None:
    assert violated_fields(prompt_token_ids=[1, token_id]) == ["prompt_token_ids"]


def test_prompt_as_long_as_the_context_is_rejected() -> None:
    assert violated_fields(prompt="a" * LIMITS.max_model_len) == ["prompt"]
    assert violated_fields(prompt_token_ids=[1] * LIMITS.max_model_len) == ["prompt_token_ids"]


def test_prompt_one_shorter_than_the_context_is_accepted() -> None:
    validate(prompt="a" * (LIMITS.max_model_len - 1))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (dict(max_tokens=0), "params.max_tokens"),
        (dict(max_tokens=-3), "params.max_tokens"),
        (dict(max_tokens=LIMITS.max_model_len + 1), "params.max_tokens"),
        (dict(temperature=-0.1), "params.temperature"),
        (dict(temperature=math.nan), "params.temperature"),
        (dict(temperature=math.inf), "params.temperature"),
        (dict(top_p=0.0), "params.top_p"),
        (dict(top_p=1.5), "params.top_p"),
        (dict(top_p=-0.5), "params.top_p"),
        (dict(top_k=-1), "params.top_k"),
        (dict(stop=[""]), "params.stop"),
        (dict(stop=["x"] * 17), "params.stop"),
        (dict(stop_token_ids=[258]), "params.stop_token_ids"),
    ],
)
def test_bad_sampling_params_name_their_field(params: dict[str, object], field: str) -> None:
    assert violated_fields(prompt="a", params=params) == [field]


def test_every_bad_field_is_reported_at_once() -> None:
    fields = violated_fields(params=dict(max_tokens=0, top_k=-1))
    assert fields == ["prompt", "params.max_tokens", "params.top_k"]


def test_prefix_names_fields_inside_an_enclosing_message() -> None:
    request = generate_pb2.GenerateRequest(prompt="a", params=generate_pb2.SamplingParams(top_k=-1))
    with pytest.raises(InvalidArgumentError) as info:
        validate_generate(request, LIMITS, BYTES, prefix="request.")
    assert [v.field for v in info.value.violations] == ["request.params.top_k"]


def test_stream_requests_are_validated_alike() -> None:
    request = generate_pb2.GenerateStreamRequest(prompt="", prompt_token_ids=[])
    with pytest.raises(InvalidArgumentError):
        validate_generate(request, LIMITS, BYTES)


def test_a_prompt_too_long_for_any_tokenizer_is_refused_before_tokenizing() -> None:
    class Refuses(ShapeOnly):
        def encode(self, text: str) -> list[int]:
            raise AssertionError("tokenized")

    request = generate_pb2.GenerateRequest(prompt="a" * (LIMITS.max_model_len * 33))
    with pytest.raises(InvalidArgumentError) as info:
        validate_generate(request, LIMITS, Refuses())
    assert [v.field for v in info.value.violations] == ["prompt"]


def test_too_many_stop_token_ids_are_refused() -> None:
    fields = violated_fields(prompt="a", params=dict(stop_token_ids=[1] * 257))
    assert fields == ["params.stop_token_ids"]


@pytest.mark.parametrize(
    ("seconds", "nanos", "field"),
    [
        (-62_135_596_801, 0, "deadline.seconds"),
        (253_402_300_800, 0, "deadline.seconds"),
        (0, -1, "deadline.nanos"),
        (0, 1_000_000_000, "deadline.nanos"),
    ],
)
def test_timestamps_outside_their_range_are_named(seconds: int, nanos: int, field: str) -> None:
    request = jobs_pb2.SubmitJobRequest(
        deadline=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    )
    found: list[str] = []
    check_times(request, lambda name, why: found.append(name))
    assert found == [field]


def test_timestamps_in_range_pass() -> None:
    request = jobs_pb2.SubmitJobRequest(
        deadline=timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    )
    found: list[str] = []
    check_times(request, lambda name, why: found.append(name))
    assert found == []
