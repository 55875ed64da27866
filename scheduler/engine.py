"""The synchronous engine: admission, one scheduling step at a time, stop conditions.

`LLMEngine` is not thread-safe; `AsyncEngine` drives it from one thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from twolane.kernels.attention import get_attention_backend
from twolane.models.builtin import BUILTIN_NAME, builtin_model_dir
from twolane.models.config import ModelConfig
from twolane.models.loader import DTYPES, load_model
from twolane.models.runner import ModelRunner, StepResult
from twolane.models.sampling import make_generator
from twolane.models.tokenizer import IncrementalDetokenizer, Tokenizer
from twolane.scheduler.block_manager import BlockManager
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.errors import InvalidRequestError
from twolane.scheduler.metrics import EngineMetrics
from twolane.scheduler.request import FinishReason, Priority, RequestOutput, SamplingParams
from twolane.scheduler.scheduler import LanePolicy, ScheduledSequence, Scheduler
from twolane.scheduler.sequence import Sequence

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_interactive: int
    num_running_batch: int
    num_waiting_batch: int
    max_num_batch_seqs: int
    num_free_blocks: int
    num_used_blocks: int
    num_total_blocks: int
    block_size: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_steps: int


class _RequestState:
    """Per-request text state: detokenizer, emitted text, stop-string hold-back."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, stream: bool) -> None:
        self.seq = seq
        self.stream = stream  # False: one output at the end carrying everything
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.token_ids)
        self.text = ""
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0
        self.logprobs: list[float] = []
        # A stop string may straddle two deltas, so hold back enough text to catch it.
        self.holdback_chars = max((len(s) for s in seq.params.stop), default=1) - 1


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model_dir = (
            builtin_model_dir(config.seed) if config.model == BUILTIN_NAME else Path(config.model)
        )
        self.tokenizer = Tokenizer.from_dir(model_dir)
        dtype = DTYPES[config.dtype]
        max_positions = self._max_positions(model_dir)
        model, self.model_config = load_model(model_dir, config.dtype, config.device, max_positions)
        num_blocks = config.num_blocks or max(
            1,
            config.kv_cache_bytes
            // ModelRunner.kv_bytes_per_block(self.model_config, config.block_size, dtype),
        )
        self.max_model_len = min(max_positions, num_blocks * config.block_size)
        self.vocab_size = self.model_config.vocab_size
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        policy = LanePolicy(
            reserved_block_fraction=config.reserved_block_fraction,
            max_batch_share=config.max_batch_share,
            interactive_ttft_target_s=config.interactive_ttft_target_s,
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, policy
        )
        backend = get_attention_backend(config.attention_backend, config.device)
        self.runner = ModelRunner(
            model, self.model_config, backend, num_blocks, config.block_size, dtype, config.device
        )
        self.metrics = EngineMetrics()
        self._requests: dict[str, _RequestState] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0
        self._urgent_s = 0.0  # time spent in urgent steps inside the step in flight
        log.info(
            "engine_ready",
            model=str(model_dir),
            dtype=config.dtype,
            device=config.device,
            attention=backend.name,
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_model_len=self.max_model_len,
        )

    def _max_positions(self, model_dir: Path) -> int:
        model_len = ModelConfig.from_dir(model_dir).max_position_embeddings
        return min(model_len, self.config.max_model_len) if self.config.max_model_len else model_len

    # ---- admission -------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        priority: Priority = Priority.INTERACTIVE,
        deadline_s: float | None = None,
        arrival_time_s: float | None = None,
        stream: bool = True,
    ) -> Sequence:
        """Validate and queue a request.

        With `stream=False` the request yields a single output when it finishes,
        which saves the caller one wake-up per token.

        Raises:
            InvalidRequestError: the request can never be served as given.
            ValueError: `request_id` is already in use.
        """
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt, prompt_token_ids, params)
        seq = Sequence(
            request_id,
            token_ids,
            params,
            priority,
            arrival_index=next(self._arrivals),
            arrival_time_s=time.monotonic() if arrival_time_s is None else arrival_time_s,
            deadline_s=deadline_s,
            generator=None if params.is_greedy else make_generator(params.seed),
        )
        self._requests[request_id] = _RequestState(seq, self.tokenizer, stream)
        self.scheduler.add(seq)
        return seq

    def tokenize(
        self, prompt: str | None, prompt_token_ids: list[int] | None, params: SamplingParams
    ) -> list[int]:
        """Check a request against the model and return its prompt token ids."""
        if prompt and prompt_token_ids:
            raise InvalidRequestError("prompt", "set either prompt or prompt_token_ids, not both")
        if prompt_token_ids:
            bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    "prompt_token_ids",
                    f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                )
            token_ids = list(prompt_token_ids)
        elif prompt:
            token_ids = self.tokenizer.encode(prompt)
        else:
            raise InvalidRequestError("prompt", "the prompt is empty")
        if not token_ids:
            raise InvalidRequestError("prompt", "the prompt encodes to no tokens")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"the prompt has {len(token_ids)} tokens; the context length is "
                f"{self.max_model_len}, which must leave room for at least one new token",
            )
        if params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                "sampling_params.max_tokens",
                f"max_tokens {params.max_tokens} exceeds the context length {self.max_model_len}",
            )
        return token_ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request wherever it is; returns its final output, or None if unknown."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        return self._finish(state, FinishReason.ABORT)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- stepping --------------------------------------------------------------

    def step(self, between_layers: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Run one scheduling step and return the outputs it produced.

        `between_layers` runs between two layers of the step's forward pass; it may call
        `urgent_step` so that interactive requests arriving meanwhile start at once.
        """
        now = time.monotonic()
        sched = self.scheduler.schedule(now)
        for seq in sched.expired:
            self.metrics.observe_finished(seq, now)
        outputs = [self._final_output(self._requests.pop(s.request_id)) for s in sched.expired]
        self.metrics.observe_preempted(sched.preempted)
        self.metrics.observe_queues(
            self.scheduler.running, self.scheduler.waiting, self.block_manager.num_free_blocks
        )
        if sched.scheduled:
            self._urgent_s = 0.0
            outputs.extend(self._execute(sched.scheduled, now, between_layers, regular=True))
        return outputs

    def urgent_step(self) -> list[RequestOutput]:
        """Prefill waiting interactive requests in a step of their own, from inside the
        forward pass of a step in flight (see `step`), so they need not wait for its end.

        Only free blocks and slots are used (see `Scheduler.schedule_urgent`): a request
        that needs batch work preempted waits for the next regular step.
        """
        sched = self.scheduler.schedule_urgent()
        if not sched.scheduled:
            return []
        self.metrics.urgent_starts.inc(len(sched.scheduled))
        started = time.perf_counter()
        outputs = self._execute(sched.scheduled, time.monotonic(), None, regular=False)
        self._urgent_s += time.perf_counter() - started
        return outputs

    def _execute(
        self,
        scheduled: list[ScheduledSequence],
        now: float,
        between_layers: Callable[[], None] | None,
        regular: bool,
    ) -> list[RequestOutput]:
        self.num_steps += 1
        for item in scheduled:
            if item.seq.first_scheduled_time_s is None:
                item.seq.first_scheduled_time_s = now
        started = time.perf_counter()
        try:
            result = self.runner.execute(scheduled, between_layers)
        except Exception:
            # Fail the requests of this step and keep the engine serving the rest.
            log.exception("step_failed", num_seqs=len(scheduled))
            return [
                self._finish(state, FinishReason.ERROR, "the engine step failed")
                for item in scheduled
                if (state := self._requests.get(item.seq.request_id)) is not None
            ]
        if regular:
            # Urgent steps run inside this one's forward pass; they are not its cost.
            self.scheduler.observe_step(
                time.perf_counter() - started - self._urgent_s,
                served_interactive=any(not s.seq.priority.is_batch for s in scheduled),
            )
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit_full_blocks(item.seq)
        return self._process_samples(result)

    def _process_samples(self, result: StepResult) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for i, (request_id, token_id) in enumerate(
            zip(result.request_ids, result.token_ids, strict=True)
        ):
            state = self._requests[request_id]
            seq = state.seq
            seq.token_ids.append(token_id)
            if seq.first_token_time_s is None:
                seq.first_token_time_s = now
            if result.logprobs is not None and seq.params.logprobs:
                state.logprobs.append(result.logprobs[i])
            state.text += state.detokenizer.add(token_id)
            reason = self._stop_reason(state, token_id)
            if reason is not None:
                outputs.append(self._finish(state, reason))
            elif state.stream:
                outputs.append(self._delta(state, final=False))
        return outputs

    def _stop_reason(self, state: _RequestState, token_id: int) -> FinishReason | None:
        seq, params = state.seq, state.seq.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if params.stop and self._truncate_at_stop(state):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _truncate_at_stop(state: _RequestState) -> bool:
        """Cut the text before the first stop string, if one has appeared."""
        search_from = max(0, state.num_emitted_chars - state.holdback_chars)
        hits = [i for s in state.seq.params.stop if (i := state.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        state.text = state.text[: min(hits)]
        return True

    def _finish(
        self, state: _RequestState, reason: FinishReason, error: str | None = None
    ) -> RequestOutput:
        self.scheduler.finish(state.seq, reason)
        self.metrics.observe_finished(state.seq, time.monotonic())
        self._requests.pop(state.seq.request_id, None)
        return self._final_output(state, error)

    def _final_output(self, state: _RequestState, error: str | None = None) -> RequestOutput:
        if state.seq.finish_reason is not FinishReason.STOP or not state.seq.params.stop:
            state.text += state.detokenizer.flush()
        out = self._delta(state, final=True)
        out.error = error
        return out

    def _delta(self, state: _RequestState, final: bool) -> RequestOutput:
        seq = state.seq
        text_end = (
            len(state.text)
            if final
            else max(state.num_emitted_chars, len(state.text) - state.holdback_chars)
        )
        new_text = state.text[state.num_emitted_chars : text_end]
        state.num_emitted_chars = text_end
        new_tokens = seq.output_token_ids[state.num_emitted_tokens :]
        new_logprobs = state.logprobs[state.num_emitted_tokens :]
        state.num_emitted_tokens = seq.num_output_tokens
        ttft = (
            None if seq.first_token_time_s is None else seq.first_token_time_s - seq.arrival_time_s
        )
        queued_until = seq.first_scheduled_time_s or time.monotonic()
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_text=new_text,
            new_logprobs=new_logprobs,
            finished=final,
            finish_reason=seq.finish_reason if final else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            queue_time_s=queued_until - seq.arrival_time_s,
            ttft_s=ttft,
        )

    # ---- introspection and helpers ----------------------------------------------

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_waiting_interactive=self.scheduler.num_waiting_of(Priority.INTERACTIVE),
            num_running_batch=sum(1 for s in self.scheduler.running if s.priority.is_batch),
            num_waiting_batch=sum(1 for s in self.scheduler.waiting if s.priority.is_batch),
            max_num_batch_seqs=self.scheduler.max_num_batch_seqs,
            num_free_blocks=bm.num_free_blocks,
            num_used_blocks=bm.num_used_blocks,
            num_total_blocks=bm.num_blocks,
            block_size=bm.block_size,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
        )

    def generate(
        self, prompts_token_ids: list[list[int]], params: SamplingParams | None = None
    ) -> list[list[int]]:
        """Run prompts to completion together and return each one's output token ids."""
        ids = [f"generate-{next(self._arrivals)}" for _ in prompts_token_ids]
        for request_id, prompt in zip(ids, prompts_token_ids, strict=True):
            self.add_request(request_id, prompt_token_ids=prompt, params=params)
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id].extend(out.new_token_ids)
                    if out.finished:
                        pending.discard(out.request_id)
        return [tokens[i] for i in ids]
