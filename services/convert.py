"""Conversion between twolane.v1 messages and the engine's types, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from twolane.scheduler.protocol import EngineStats
from twolane.scheduler.request import FinishReason, SamplingParams
from twolane.v1 import generate_pb2, inference_pb2

if TYPE_CHECKING:
    from twolane.services.generation import RequestOutput

DEFAULT_MAX_TOKENS = 16

_FINISH_REASONS = {
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: generate_pb2.FINISH_REASON_ABORT,
    FinishReason.DEADLINE: generate_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: generate_pb2.FINISH_REASON_ERROR,
}


def sampling_params(params: generate_pb2.SamplingParams) -> SamplingParams:
    """Engine sampling parameters from a validated message; unset fields take defaults."""
    return SamplingParams(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=params.temperature,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
    )


def finish_reason(reason: FinishReason | None) -> generate_pb2.FinishReason.ValueType:
    if reason is None:
        return generate_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_REASONS[reason]


def usage(out: RequestOutput) -> generate_pb2.Usage:
    return generate_pb2.Usage(
        prompt_tokens=out.num_prompt_tokens,
        completion_tokens=out.num_output_tokens,
        cached_tokens=out.num_cached_tokens,
    )


def timing(out: RequestOutput, total_time_s: float) -> generate_pb2.Timing:
    return generate_pb2.Timing(
        queue_time_s=out.queue_time_s,
        ttft_s=out.ttft_s or 0.0,
        total_time_s=total_time_s,
    )


def generate_response(
    request_id: str, outputs: Sequence[RequestOutput], total_time_s: float
) -> generate_pb2.GenerateResponse:
    """The whole result from all of a request's updates; the last one is final."""
    final = outputs[-1]
    return generate_pb2.GenerateResponse(
        request_id=request_id,
        text="".join(out.new_text for out in outputs),
        token_ids=[t for out in outputs for t in out.new_token_ids],
        logprobs=[lp for out in outputs for lp in out.new_logprobs],
        finish_reason=finish_reason(final.finish_reason),
        usage=usage(final),
        timing=timing(final, total_time_s),
    )


def stream_response(
    request_id: str, out: RequestOutput, total_time_s: float
) -> generate_pb2.GenerateStreamResponse:
    """One stream message; the final update also carries finish reason, usage and timing."""
    message = generate_pb2.GenerateStreamResponse(
        request_id=request_id,
        text=out.new_text,
        token_ids=out.new_token_ids,
        logprobs=out.new_logprobs,
    )
    if out.finished:
        message.finish_reason = finish_reason(out.finish_reason)
        message.usage.CopyFrom(usage(out))
        message.timing.CopyFrom(timing(out, total_time_s))
    return message


def stats_response(stats: EngineStats, model_name: str = "") -> inference_pb2.GetStatsResponse:
    """GetStats reply from the engine's EngineStats."""
    return inference_pb2.GetStatsResponse(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_free_blocks=stats.num_free_blocks,
        num_used_blocks=stats.num_used_blocks,
        num_total_blocks=stats.num_total_blocks,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        num_preemptions=stats.num_preemptions,
        model_name=model_name,
        num_running_interactive=stats.num_running - stats.num_running_batch,
        num_waiting_interactive=stats.num_waiting_interactive,
        num_running_batch=stats.num_running_batch,
        num_waiting_batch=stats.num_waiting_batch,
        num_workers=1,
        num_steps=stats.num_steps,
    )
