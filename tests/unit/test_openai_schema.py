"""OpenAI request bodies become twolane's GenerateRequests, and twolane's errors and
results become OpenAI's shapes: the translation every HTTP route and batch line uses."""

from __future__ import annotations

import pytest

from twolane.scheduler.config import served_model_name
from twolane.scheduler.errors import QueueFullError
from twolane.scheduler.request import FinishReason
from twolane.services.errors import (
    FieldViolation,
    InvalidArgumentError,
    RateLimitedError,
    UnauthenticatedError,
    UnavailableError,
)
from twolane.services.generation import RequestOutput
from twolane.services.http_errors import ModelNotFoundError, http_error
from twolane.services.openai_format import (
    ChoiceStream,
    Reply,
    chunk,
    response_body,
)
from twolane.services.openai_schema import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    ChatCompletionRequest,
    CompletionRequest,
    generate_requests,
    openai_field,
    parse,
)
from twolane.v1 import generate_pb2


def fields(exc: pytest.ExceptionInfo[InvalidArgumentError]) -> list[str]:
    return [v.field for v in exc.value.violations]


def test_unknown_fields_are_refused_by_name() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse(CompletionRequest, b'{"prompt": "x", "max_token": 3, "best_of": 2}')
    assert fields(info) == ["max_token", "best_of"]
    assert "unknown or unsupported field" in str(info.value)


def test_a_missing_or_mistyped_field_is_named_with_its_path() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": 3}]}')
    assert fields(info) == ["messages[0].content"]
    with pytest.raises(InvalidArgumentError) as info:
        parse(CompletionRequest, b"{}")
    assert fields(info) == ["prompt"]
    with pytest.raises(InvalidArgumentError) as info:
        parse(CompletionRequest, b"{not json")
    assert fields(info) == ["body"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", [("hi", [])]),
        ([5, 6], [("", [5, 6])]),
        (["a", "b"], [("a", []), ("b", [])]),
        ([[1], [2, 3]], [("", [1]), ("", [2, 3])]),
    ],
)
def test_each_kind_of_prompt_becomes_one_request_per_prompt(
    prompt: object, expected: list[tuple[str, list[int]]]
) -> None:
    body = parse(CompletionRequest, {"prompt": prompt})
    requests = generate_requests(body, None)
    assert [(r.prompt, list(r.prompt_token_ids)) for r in requests] == expected


def test_openai_defaults_apply_where_the_body_is_silent() -> None:
    (completion,) = generate_requests(parse(CompletionRequest, {"prompt": "x"}), None)
    assert completion.params.max_tokens == 16 and completion.params.temperature == 1.0
    assert not completion.params.HasField("top_p") and not completion.params.logprobs
    chat = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})
    (request,) = generate_requests(chat, 2048)
    assert request.params.max_tokens == 2048  # a chat runs to the context's end
    both = parse(
        ChatCompletionRequest,
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 5,
            "max_completion_tokens": 7,
        },
    )
    assert generate_requests(both, 2048)[0].params.max_tokens == 7


def test_text_parts_of_a_message_are_joined() -> None:
    body = parse(
        ChatCompletionRequest,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        },
    )
    assert generate_requests(body, None)[0].messages[0].content == "ab"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": ["a"] * 9, "n": 2}, "prompt"),
        ({"prompt": "x", "logprobs": 3}, "logprobs"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_what_twolane_cannot_do_is_refused_by_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        generate_requests(parse(CompletionRequest, body), None)
    assert fields(info) == [field]


def test_validator_field_names_read_as_openai_names() -> None:
    assert openai_field("params.max_tokens") == "max_tokens"
    assert openai_field("prompt_token_ids") == "prompt"
    assert openai_field("body.params.top_p") == "body.top_p"
    assert openai_field("messages[1].role") == "messages[1].role"


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (InvalidArgumentError([FieldViolation("params.top_p", "bad")]), 400, None),
        (UnauthenticatedError("no key"), 401, "invalid_api_key"),
        (ModelNotFoundError("no such model"), 404, "model_not_found"),
        (QueueFullError("full"), 429, "rate_limit_exceeded"),
        (UnavailableError("down"), 503, "service_unavailable"),
        (RuntimeError("a bug"), 500, None),
    ],
)
def test_errors_get_fitting_http_statuses_in_openais_shape(
    exc: Exception, status: int, code: str | None
) -> None:
    error = http_error(exc)
    assert error.status == status
    assert set(error.body["error"]) == {"message", "type", "param", "code"}
    assert error.body["error"]["code"] == code
    assert ("Retry-After" in error.headers) == (status in (429, 503))
    if status == 400:
        assert error.body["error"]["param"] == "top_p"
        assert error.body["error"]["message"] == "top_p: bad"
    if status == 500:
        assert error.body["error"]["message"] == "internal error"  # no details leak


def test_retry_after_is_the_wait_grpc_callers_get_rounded_up_to_whole_seconds() -> None:
    assert http_error(RateLimitedError("over quota", retry_after_s=59.2)).headers == {
        "Retry-After": "60"
    }
    assert http_error(RateLimitedError("soon", retry_after_s=0.01)).headers["Retry-After"] == "1"
    assert http_error(QueueFullError("full")).headers["Retry-After"] == "1"
    assert http_error(UnavailableError("down")).headers["Retry-After"] == "1"


def result(text: str, tokens: list[int], prompt_tokens: int) -> generate_pb2.GenerateResponse:
    return generate_pb2.GenerateResponse(
        text=text,
        token_ids=tokens,
        finish_reason=generate_pb2.FINISH_REASON_STOP,
        usage=generate_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(tokens)),
    )


def test_usage_counts_each_prompt_once_and_every_choice() -> None:
    reply = Reply("cmpl-1", COMPLETIONS, "m", 1, n=2)
    body = response_body(
        reply,
        [result("a", [1], 5), result("b", [2, 3], 5), result("c", [4], 7), result("", [], 7)],
        None,
    )
    assert [c["text"] for c in body["choices"]] == ["a", "b", "c", ""]
    assert body["usage"]["prompt_tokens"] == 12
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "stop"


def test_a_chat_stream_names_the_role_first_then_sends_content() -> None:
    reply = Reply("chatcmpl-1", CHAT_COMPLETIONS, "m", 1)
    sent = ChoiceStream()
    first = chunk(reply, 0, RequestOutput("r", [1], "He"), sent, None, include_usage=False)
    last = RequestOutput("r", [2], "y", finished=True, finish_reason=FinishReason.STOP)
    second = chunk(reply, 0, last, sent, None, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert second["choices"][0]["delta"] == {"content": "y"}
    assert second["choices"][0]["finish_reason"] == "stop" and second["usage"] is None
    assert first["object"] == "chat.completion.chunk"


def test_the_served_model_name_comes_from_the_model() -> None:
    assert served_model_name("builtin") == "builtin"
    assert served_model_name("/models/Llama-3-8B/") == "Llama-3-8B"
