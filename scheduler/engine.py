"""The synchronous engine core: admission, one scheduling step at a time, stop conditions.

Token ids in, token ids out: text, tokenizing and stop strings belong to the frontends.
`EngineCore` is not thread-safe; `core_process.EngineCoreProc` drives it from one loop.
"""

from __future__ import annotations

import collections
import itertools
import time
from pathlib import Path

import msgspec
import structlog

from twolane.kernels.attention import TorchAttentionBackend, get_attention_backend
from twolane.models.batch import BatchSequence, ForwardHook, SamplingRow
from twolane.models.config import ModelConfig
from twolane.models.loader import DTYPES, compute_dtype, load_model
from twolane.models.resolve import resolve_model_dir
from twolane.models.runner import ModelRunner, StepResult
from twolane.models.sampling import make_generator
from twolane.scheduler.block_manager import BlockManager
from twolane.scheduler.config import EngineConfig, served_model_name
from twolane.scheduler.metrics import EngineMetrics
from twolane.scheduler.protocol import AddRequest, EngineStats, Load, TokenOutput, final_output
from twolane.scheduler.request import ErrorCode, FinishReason, Priority, SamplingParams
from twolane.scheduler.scheduler import LanePolicy, ScheduledSequence, Scheduler
from twolane.scheduler.sequence import Sequence

log = structlog.get_logger(__name__)

MAX_LOGGED_IDS = 8


class _RequestState:
    """What the core keeps per request besides its sequence."""

    def __init__(self, seq: Sequence, stream: bool) -> None:
        self.seq = seq
        self.stream = stream  # False: one output at the end carrying every token
        self.num_emitted_tokens = 0
        self.logprobs: list[float] = []


# Weight of the newest step in the recent step time reported with the load.
_STEP_TIME_WEIGHT = 0.2


class EngineCore:
    """One engine: scheduler, block manager and model runner, stepped by its caller.

    With `record_cache_events`, the block hashes entering and leaving the prefix cache
    are kept until `drain_cache_events` (the core process publishes them)."""

    def __init__(
        self, config: EngineConfig, instance_id: str = "", record_cache_events: bool = False
    ) -> None:
        self.config = config
        self.instance_id = instance_id
        self.model_dir = resolve_model_dir(config.model, config.seed)
        dtype = DTYPES[config.dtype]  # the KV cache's
        self.compute_dtype = compute_dtype(config.dtype, config.device, config.bf16_compute)
        if self.compute_dtype != config.dtype:
            log.info(
                "bf16_compute_in_float32",
                reason="no AVX512-BF16 or AMX on this CPU"
                if config.bf16_compute == "auto"
                else "--bf16-compute float32",
                kv_cache="bfloat16",
            )
        max_positions = self._max_positions(self.model_dir)
        model, self.model_config = load_model(
            self.model_dir, self.compute_dtype, config.device, max_positions
        )
        num_blocks = config.num_blocks or max(
            1,
            config.kv_cache_bytes
            // ModelRunner.kv_bytes_per_block(self.model_config, config.block_size, dtype),
        )
        self.max_model_len = min(max_positions, num_blocks * config.block_size)
        self.vocab_size = self.model_config.vocab_size
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, record_cache_events
        )
        policy = LanePolicy(
            reserved_block_fraction=config.reserved_block_fraction,
            max_batch_share=config.max_batch_share,
            interactive_ttft_target_s=config.interactive_ttft_target_s,
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, policy
        )
        backend = get_attention_backend(
            config.attention_backend, config.device, self.model_config.head_dim, dtype
        )
        if isinstance(backend, TorchAttentionBackend) and backend.fallback_reason:
            log.warning(
                "native_attention_unavailable", reason=backend.fallback_reason, using="torch"
            )
        self.runner = ModelRunner(
            model, self.model_config, backend, num_blocks, config.block_size, dtype, config.device
        )
        self.metrics = EngineMetrics(served_model_name(config.model))
        self._requests: dict[str, _RequestState] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.step_time_s = 0.0  # recent regular steps, exponentially weighted
        self._urgent_s = 0.0  # time spent in urgent steps inside the step in flight
        log.info(
            "engine_ready",
            model=str(self.model_dir),
            dtype=config.dtype,
            compute_dtype=self.compute_dtype,
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

    def add_request(self, request: AddRequest) -> TokenOutput | None:
        """Queue a request; returns its final output at once when it is refused.

        The frontend's validator has checked the request against this model. What is
        checked here only keeps a faulty client from breaking the core.
        """
        if request.request_id in self._requests:
            return self._refuse(request, ErrorCode.REJECTED, "the request id is already in use")
        problem = self._structural_problem(request)
        if problem is not None:
            log.error("request_refused", request_id=request.request_id, problem=problem)
            return self._refuse(request, ErrorCode.REJECTED, problem)
        if request.priority is Priority.INTERACTIVE:
            num_waiting = self.scheduler.num_waiting_of(Priority.INTERACTIVE)
            if num_waiting >= self.config.max_waiting_interactive:
                return self._refuse(
                    request,
                    ErrorCode.QUEUE_FULL,
                    f"{num_waiting} interactive requests are waiting; retry later",
                )
        params = request.params
        seq = Sequence(
            request.request_id,
            request.prompt_token_ids,
            params,
            request.priority,
            arrival_index=next(self._arrivals),
            arrival_time_s=request.arrival_time_s,
            deadline_s=request.deadline_s,
            generator=None if params.is_greedy else make_generator(params.seed),
            tenant=request.tenant,
        )
        self._requests[request.request_id] = _RequestState(seq, request.stream)
        self.scheduler.add(seq)
        return None

    def _structural_problem(self, request: AddRequest) -> str | None:
        tokens = request.prompt_token_ids
        if not tokens:
            return "the prompt has no tokens"
        if len(tokens) >= self.max_model_len:
            return (
                f"the prompt has {len(tokens)} tokens; the context length is {self.max_model_len}"
            )
        if min(tokens) < 0 or max(tokens) >= self.vocab_size:
            return f"a prompt token id is outside the vocabulary [0, {self.vocab_size})"
        params = request.params
        if params.max_tokens <= 0:
            return "max_tokens must be positive"
        if not 0.0 < params.top_p <= 1.0:
            # top_p <= 0 would leave no token to draw from (NaN fails the test too).
            return "top_p must be in (0, 1]"
        return None

    def _refuse(self, request: AddRequest, code: ErrorCode, error: str) -> TokenOutput:
        self.metrics.refused.labels(code.value).inc()
        return final_output(request.request_id, code, error)

    def abort(self, request_id: str) -> TokenOutput | None:
        """Cancel a request wherever it is; returns its final output, or None if unknown."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        return self._finish(state, FinishReason.ABORT)

    def abort_all(self, code: ErrorCode, error: str) -> list[TokenOutput]:
        """End every request (the core is stopping); their blocks come back."""
        outputs = []
        for state in list(self._requests.values()):
            out = self._finish(state, FinishReason.ERROR)
            outputs.append(_with_error(out, code, error))
        return outputs

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    # ---- stepping --------------------------------------------------------------

    def step(self, hook: ForwardHook | None = None) -> list[TokenOutput]:
        """Run one scheduling step and return the outputs it produced.

        `hook` runs between two layers of the step's forward pass; it may call
        `urgent_step` so that interactive requests arriving meanwhile start at once.
        """
        started_s = time.perf_counter()
        now = time.monotonic()
        outputs = self._shed_stale(now)
        sched = self.scheduler.schedule(now)
        for seq in sched.expired:
            self.metrics.observe_finished(seq, now)
        outputs += [self._final_output(self._requests.pop(s.request_id)) for s in sched.expired]
        self.metrics.observe_preempted(sched.preempted)
        self.metrics.step_phase_s.labels("schedule").observe(time.perf_counter() - started_s)
        if sched.scheduled:
            self._urgent_s = 0.0
            outputs.extend(self._execute(sched.scheduled, now, hook, regular=True))
        self.refresh_gauges()
        return outputs

    def _shed_stale(self, now: float) -> list[TokenOutput]:
        """Refuse interactive requests that waited `max_queue_delay_s` without starting.

        A saturated engine then sheds load (the frontend answers RESOURCE_EXHAUSTED with a
        retry delay) instead of letting every request's time to first token grow with the
        queue. Requests that have started (and were preempted since) are never shed.
        """
        limit_s = self.config.max_queue_delay_s
        if limit_s <= 0:
            return []
        stale = []
        for seq in self.scheduler.waiting:  # interactive first, oldest first
            if seq.priority is not Priority.INTERACTIVE:
                break
            if seq.first_scheduled_time_s is None and now - seq.arrival_time_s > limit_s:
                stale.append(seq)
        outputs = []
        for seq in stale:
            out = self._finish(self._requests[seq.request_id], FinishReason.ERROR)
            self.metrics.refused.labels(ErrorCode.QUEUE_FULL.value).inc()
            error = f"no room to start within {limit_s:g} s; retry later"
            outputs.append(_with_error(out, ErrorCode.QUEUE_FULL, error))
        return outputs

    def refresh_gauges(self) -> None:
        """Running, waiting and free-block gauges as they are now (after a step or an
        abort), so a scrape never shows a request that has finished."""
        bm = self.block_manager
        self.metrics.observe_queues(
            self.scheduler.running, self.scheduler.waiting, bm.num_free_blocks, bm.num_blocks
        )
        self.metrics.observe_prefix_cache(bm.num_prefix_query_tokens, bm.num_prefix_hit_tokens)

    def urgent_step(self) -> list[TokenOutput]:
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
        self.refresh_gauges()
        return outputs

    def _execute(
        self,
        scheduled: list[ScheduledSequence],
        now: float,
        hook: ForwardHook | None,
        regular: bool,
    ) -> list[TokenOutput]:
        self.num_steps += 1
        for item in scheduled:
            if item.seq.first_scheduled_time_s is None:
                item.seq.first_scheduled_time_s = now
        draws = _Draws(scheduled)
        started = time.perf_counter()
        try:
            result = self.runner.execute([_batch_sequence(item) for item in scheduled], hook)
        except Exception as error:
            return self._recover(scheduled, draws, error)
        if regular:
            # Urgent steps run inside this one's forward pass; they are not its cost.
            duration_s = time.perf_counter() - started - self._urgent_s
            self.scheduler.observe_step(
                duration_s,
                served_interactive=any(not s.seq.priority.is_batch for s in scheduled),
            )
            self.step_time_s += _STEP_TIME_WEIGHT * (duration_s - self.step_time_s)
            self._observe_phases(result)
        return self._commit(scheduled, result, regular)

    def _commit(
        self, scheduled: list[ScheduledSequence], result: StepResult, regular: bool
    ) -> list[TokenOutput]:
        """Take a step's results: computed tokens, full blocks for the prefix cache, samples."""
        sampled = [item.seq for item in scheduled if item.samples]
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit_full_blocks(item.seq)
        postprocess_started = time.perf_counter()
        outputs = self._process_samples(sampled, result)
        if regular:
            self.metrics.step_phase_s.labels("postprocess").observe(
                time.perf_counter() - postprocess_started
            )
        return outputs

    def _recover(
        self, scheduled: list[ScheduledSequence], draws: _Draws, error: Exception
    ) -> list[TokenOutput]:
        """A step raised `error`: find the sequences that cause it and fail only those.

        The step's sequences run again in halves, without the layer hook. A half that runs
        is committed as the step would have been; a half that raises is split again, so a
        sequence fails only when it raises on its own, and a failure that does not come
        back fails nobody. Running a sequence's tokens again is safe: they write the same
        KV slots (of blocks the scheduler allocated for this step, which stay where they
        are) that the failed step may have written for some of its layers, and every
        random generator is put back where it stood before the step, so no draw is lost.
        """
        outputs: list[TokenOutput] = []
        culprits: list[ScheduledSequence] = []
        suspects = [scheduled]
        while suspects:
            group = suspects.pop()
            if len(group) == 1:
                culprits.append(group[0])
                continue
            middle = len(group) // 2
            for half in (group[:middle], group[middle:]):
                draws.restore(half)
                try:
                    result = self.runner.execute([_batch_sequence(item) for item in half])
                except Exception:
                    suspects.append(half)
                else:
                    outputs.extend(self._commit(half, result, regular=False))
        failed_ids = [item.seq.request_id for item in culprits]
        for request_id in failed_ids:
            state = self._requests.get(request_id)
            if state is not None:
                out = self._finish(state, FinishReason.ERROR)
                outputs.append(_with_error(out, ErrorCode.ENGINE_FAILED, "the engine step failed"))
        # Once per failed step, however many runs it took to find the culprits.
        log.error(
            "step failed",
            num_seqs=len(scheduled),
            num_failed=len(failed_ids),
            failed_request_ids=failed_ids[:MAX_LOGGED_IDS],
            exc_info=error,
        )
        return outputs

    def _observe_phases(self, result: StepResult) -> None:
        phases = self.metrics.step_phase_s
        phases.labels("prepare").observe(result.prepare_s)
        phases.labels("forward").observe(max(0.0, result.forward_s - self._urgent_s))
        phases.labels("sample").observe(result.sample_s)
        if self._urgent_s:
            phases.labels("urgent").observe(self._urgent_s)

    def _process_samples(self, sampled: list[Sequence], result: StepResult) -> list[TokenOutput]:
        outputs: list[TokenOutput] = []
        now = time.monotonic()
        for i, (seq, token_id) in enumerate(zip(sampled, result.token_ids, strict=True)):
            state = self._requests[seq.request_id]
            seq.token_ids.append(token_id)
            if seq.first_token_time_s is None:
                seq.first_token_time_s = now
            if result.logprobs is not None and seq.params.logprobs:
                state.logprobs.append(result.logprobs[i])
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                outputs.append(self._finish(state, reason))
            elif state.stream:
                outputs.append(self._delta(state, final=False))
        return outputs

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, state: _RequestState, reason: FinishReason) -> TokenOutput:
        self.scheduler.finish(state.seq, reason)
        self.metrics.observe_finished(state.seq, time.monotonic())
        self._requests.pop(state.seq.request_id, None)
        return self._final_output(state)

    def _final_output(self, state: _RequestState) -> TokenOutput:
        return self._delta(state, final=True)

    def _delta(self, state: _RequestState, final: bool) -> TokenOutput:
        seq = state.seq
        new_tokens = seq.output_token_ids[state.num_emitted_tokens :]
        new_logprobs = state.logprobs[state.num_emitted_tokens :]
        state.num_emitted_tokens = seq.num_output_tokens
        ttft = (
            None if seq.first_token_time_s is None else seq.first_token_time_s - seq.arrival_time_s
        )
        queued_until = seq.first_scheduled_time_s or time.monotonic()
        return TokenOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            new_logprobs=new_logprobs,
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

    def load(self) -> Load:
        running, waiting = self.scheduler.running, self.scheduler.waiting
        num_running_batch = sum(1 for s in running if s.priority.is_batch)
        num_waiting_batch = sum(1 for s in waiting if s.priority.is_batch)
        by_tenant = collections.Counter(state.seq.tenant for state in self._requests.values())
        return Load(
            instance_id=self.instance_id,
            num_steps=self.num_steps,
            num_running_interactive=len(running) - num_running_batch,
            num_waiting_interactive=len(waiting) - num_waiting_batch,
            num_running_batch=num_running_batch,
            num_waiting_batch=num_waiting_batch,
            max_num_batch_seqs=self.scheduler.max_num_batch_seqs,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_blocks=self.block_manager.num_blocks,
            num_requests_by_tenant=dict(by_tenant),
            step_time_s=self.step_time_s,
        )

    def drain_cache_events(self) -> tuple[list[int], list[int]]:
        """The (stored, evicted) block hashes since the last call; empty lists unless the
        core records cache events."""
        events = self.block_manager.events
        return events.drain() if events is not None else ([], [])

    def generate(
        self, prompts_token_ids: list[list[int]], params: SamplingParams | None = None
    ) -> list[list[int]]:
        """Run prompts to completion together and return each one's output token ids."""
        params = params or SamplingParams()
        ids = [f"generate-{next(self._arrivals)}" for _ in prompts_token_ids]
        for request_id, prompt in zip(ids, prompts_token_ids, strict=True):
            refused = self.add_request(
                AddRequest(request_id, prompt, params, Priority.INTERACTIVE, time.monotonic())
            )
            if refused is not None:
                raise ValueError(f"{request_id}: {refused.error}")
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id].extend(out.new_token_ids)
                    if out.finished:
                        pending.discard(out.request_id)
        return [tokens[i] for i in ids]


class _Draws:
    """Where the random generator of each sampling sequence of a step stood before it,
    so that the step can run again and draw the same numbers."""

    def __init__(self, scheduled: list[ScheduledSequence]) -> None:
        self._states = {
            item.seq.request_id: generator.get_state()
            for item in scheduled
            if item.samples and (generator := item.seq.generator) is not None
        }

    def restore(self, scheduled: list[ScheduledSequence]) -> None:
        for item in scheduled:
            state = self._states.get(item.seq.request_id)
            if state is not None and item.seq.generator is not None:
                item.seq.generator.set_state(state)


def _batch_sequence(item: ScheduledSequence) -> BatchSequence:
    seq = item.seq
    start = seq.num_computed_tokens
    sampling = None
    if item.samples:
        params = seq.params
        sampling = SamplingRow(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            generator=seq.generator,
            logprobs=params.logprobs,
        )
    return BatchSequence(
        token_ids=seq.token_ids[start : start + item.num_new_tokens],
        num_computed_tokens=start,
        block_table=seq.block_table,
        sampling=sampling,
    )


def _with_error(out: TokenOutput, code: ErrorCode, error: str) -> TokenOutput:
    return msgspec.structs.replace(
        out, finish_reason=FinishReason.ERROR, error_code=code, error=error
    )
