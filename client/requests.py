"""Request messages from the arguments of the client's methods."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Literal, TypedDict

from twolane.v1 import generate_pb2, jobs_pb2

Tier = Literal["urgent", "standard", "bulk"]
TIERS: dict[str, jobs_pb2.JobTier.ValueType] = {
    "urgent": jobs_pb2.JOB_TIER_URGENT,
    "standard": jobs_pb2.JOB_TIER_STANDARD,
    "bulk": jobs_pb2.JOB_TIER_BULK,
}
FINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCEEDED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_EXPIRED,
    }
)

# A prompt: text, token ids, or a whole request (its own params, messages, ...).
Prompt = str | Sequence[int] | generate_pb2.GenerateRequest
# A conversation: messages, {"role": ..., "content": ...} mappings or (role, content) pairs.
Message = generate_pb2.ChatMessage | Mapping[str, str] | tuple[str, str]


class Sampling(TypedDict, total=False):
    """Sampling parameters as keyword arguments (the fields of `SamplingParams`)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    logprobs: bool
    ignore_eos: bool


def generate_request(
    prompt: Prompt | None, messages: Sequence[Message] | None, sampling: Sampling
) -> generate_pb2.GenerateRequest:
    """The GenerateRequest for one of `prompt` and `messages`, with `sampling` applied.

    Raises:
        TypeError: neither or both of `prompt` and `messages` were given.
    """
    if (prompt is None) == (messages is None):
        raise TypeError("pass exactly one of a prompt and messages")
    if isinstance(prompt, generate_pb2.GenerateRequest):
        request = generate_pb2.GenerateRequest()
        request.CopyFrom(prompt)
    elif isinstance(prompt, str):
        request = generate_pb2.GenerateRequest(prompt=prompt)
    elif prompt is not None:
        request = generate_pb2.GenerateRequest(prompt_token_ids=list(prompt))
    else:
        assert messages is not None
        request = generate_pb2.GenerateRequest(messages=[chat_message(m) for m in messages])
    if sampling:
        # Keyword arguments win over what a given request already set.
        request.params.MergeFrom(generate_pb2.SamplingParams(**sampling))
    return request


def stream_request(request: generate_pb2.GenerateRequest) -> generate_pb2.GenerateStreamRequest:
    return generate_pb2.GenerateStreamRequest.FromString(request.SerializeToString())


def chat_message(message: Message) -> generate_pb2.ChatMessage:
    if isinstance(message, generate_pb2.ChatMessage):
        return message
    if isinstance(message, tuple):
        role, content = message
        return generate_pb2.ChatMessage(role=role, content=content)
    return generate_pb2.ChatMessage(role=message["role"], content=message["content"])


def submit_request(
    request: generate_pb2.GenerateRequest,
    tier: Tier,
    idempotency_key: str | None,
    custom_id: str,
    job_deadline_s: float | None,
) -> jobs_pb2.SubmitJobRequest:
    """A SubmitJobRequest that always has an idempotency key: a retry of it can never
    queue a second job."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {sorted(TIERS)}, got {tier!r}")
    submit = jobs_pb2.SubmitJobRequest(
        request=request,
        tier=TIERS[tier],
        idempotency_key=idempotency_key or new_idempotency_key(),
        custom_id=custom_id,
    )
    if job_deadline_s is not None:
        submit.deadline.FromNanoseconds(time.time_ns() + int(job_deadline_s * 1e9))
    return submit


def new_idempotency_key() -> str:
    return f"client-{uuid.uuid4().hex}"


def new_request_id() -> str:
    return uuid.uuid4().hex


def result_of_event(event: jobs_pb2.JobEvent) -> jobs_pb2.GetResultResponse:
    """A completion event as the GetResultResponse the job now has (without the times
    it started and was created, which events do not carry)."""
    response = jobs_pb2.GetResultResponse(
        job_id=event.job_id, state=event.state, error=event.error, custom_id=event.custom_id
    )
    if event.HasField("result"):
        response.result.CopyFrom(event.result)
    if event.HasField("finished_at"):
        response.finished_at.CopyFrom(event.finished_at)
    return response
