"""What a log line may hold: bounded values, never a request's payload."""

from __future__ import annotations

from twolane.services.logging import (
    MAX_TRACEBACK_CHARS,
    MAX_VALUE_CHARS,
    bound_values,
)
from twolane.v1 import generate_pb2


def bounded(**event: object) -> dict[str, object]:
    return bound_values(None, "info", dict(event))


def test_a_message_is_logged_by_its_type_and_size_only() -> None:
    request = generate_pb2.GenerateRequest(prompt_token_ids=[987_654_321] * 20_000)
    out = bounded(event="failed", request=request)
    assert out["request"] == f"<twolane.v1.GenerateRequest, {request.ByteSize()} bytes>"


def test_long_values_are_cut_and_plain_ones_kept() -> None:
    out = bounded(event="x", text="a" * 100_000, ids=list(range(20_000)), n=3, ok=True, none=None)
    assert len(out["text"]) <= MAX_VALUE_CHARS + 64
    assert len(out["ids"]) <= MAX_VALUE_CHARS + 64 and "19984 more items" in out["ids"]
    assert (out["n"], out["ok"], out["none"]) == (3, True, None)


def test_a_traceback_keeps_its_start_and_its_error_line() -> None:
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 10_000 + "ValueError: boom"
    out = bounded(event="x", exception=traceback)
    assert len(out["exception"]) <= MAX_TRACEBACK_CHARS + 64
    assert out["exception"].startswith("Traceback") and out["exception"].endswith("boom")
