"""Iteration-level continuous batching over the paged KV cache, with two lanes.

Every step the scheduler builds one batch under a token budget and a sequence cap.
It considers work in this order: running interactive sequences, waiting interactive
ones, running batch sequences, waiting batch ones; inside a lane, better class first
(urgent > standard > bulk), and inside a class turns fair across tenants (first come
first served within one tenant). A long
prompt is prefilled in chunks across steps, side by side with other sequences'
decodes.

Interactive work never waits behind batch work: when blocks, the token budget or
the sequence cap stand in its way, batch sequences are preempted (freed and later
recomputed, usually from the prefix cache), lowest class and newest first. Batch
work also keeps out of a block reserve, leaves some sequence slots free, and, while
interactive work is around, takes only as many tokens per step as keep steps
within half the interactive first-token target (adapted from measured steps).

A request that arrives while a step is in flight need not wait for it: between two
layers the engine may run an urgent step (`schedule_urgent`) that prefills waiting
interactive requests alone, using only free blocks and slots.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from twolane.scheduler.block_manager import BlockManager
from twolane.scheduler.request import FinishReason, Priority
from twolane.scheduler.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class LanePolicy:
    """How much room batch work leaves for the interactive lane (see EngineConfig)."""

    reserved_block_fraction: float = 0.0
    max_batch_share: float = 1.0
    interactive_ttft_target_s: float = math.inf


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last token, so it yields a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    expired: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class _Step:
    """Working state of one `schedule` call."""

    out: SchedulerOutput
    budget: int
    batch_budget: int
    # Running sequences not yet considered this step, best first; victims come off the end.
    queue: list[Sequence]

    def take(self, seq: Sequence, num_new: int) -> None:
        self.out.scheduled.append(ScheduledSequence(seq, num_new))
        self.budget -= num_new
        if seq.priority.is_batch:
            self.batch_budget -= num_new


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: LanePolicy | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy or LanePolicy()
        self.num_reserved_blocks = int(
            block_manager.num_blocks * self.policy.reserved_block_fraction
        )
        self.max_num_batch_seqs = max(1, int(max_num_seqs * self.policy.max_batch_share))
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        # Start-time fair queueing inside each class: a tenant's next request is tagged
        # after both its own last one and the class's virtual time (the tag of the newest
        # request started), so a tenant with 10,000 queued requests does not push another
        # tenant's new one behind all of them; with one tenant this is first come, first
        # served.
        self._last_tag: dict[tuple[Priority, str], int] = {}
        self._virtual_time: dict[Priority, int] = {}
        self.num_preemptions = 0
        # Batch tokens allowed in a step that also serves interactive work. Adjusted after
        # every such step: cut when the step ran past half the TTFT target, grown otherwise,
        # so batch work takes what the interactive latency target leaves.
        self.batch_token_allowance = max_num_batched_tokens

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_waiting_of(self, priority: Priority) -> int:
        return sum(1 for s in self.waiting if s.priority is priority)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if seq.fair_tag is None:
            lane = (seq.priority, seq.tenant)
            start = max(self._virtual_time.get(seq.priority, 0), self._last_tag.get(lane, 0))
            seq.fair_tag = self._last_tag[lane] = start + 1
        keys = [s.sort_key for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.sort_key), seq)

    def observe_step(self, duration_s: float, served_interactive: bool) -> None:
        """Adapt the batch allowance to a finished step's duration."""
        if not served_interactive or math.isinf(self.policy.interactive_ttft_target_s):
            return
        if duration_s > 0.5 * self.policy.interactive_ttft_target_s:
            self.batch_token_allowance = max(1, int(self.batch_token_allowance * 0.7))
        else:
            grown = self.batch_token_allowance + max(1, self.batch_token_allowance // 16)
            self.batch_token_allowance = min(self.max_num_batched_tokens, grown)

    def schedule(self, now_s: float) -> SchedulerOutput:
        out = SchedulerOutput(expired=self._drop_expired(now_s))
        step = _Step(
            out,
            budget=self.max_num_batched_tokens,
            batch_budget=self._batch_token_budget(),
            queue=sorted(self.running, key=lambda s: s.sort_key),
        )
        self._restore_seq_cap(step)
        self._schedule_running(step, batch=False)
        self._admit_waiting(step, batch=False)
        if any(
            s.seq.priority is Priority.INTERACTIVE and s.seq.num_output_tokens == 0
            for s in out.scheduled
        ):
            # A step that brings interactive requests to their first token carries no batch
            # work: batch decodes would only make that step, and so the TTFT, longer.
            return out
        self._schedule_running(step, batch=True)
        # Admitting batch work right after preempting would only thrash the cache.
        if not out.preempted:
            self._admit_waiting(step, batch=True)
        return out

    def schedule_urgent(self) -> SchedulerOutput:
        """A step of waiting interactive requests alone, to run while another step is in flight.

        Every running sequence may belong to the step in flight, so nothing is preempted
        and only free blocks are used. A new request may take a slot past `max_num_seqs`
        while batch sequences hold slots; the next `schedule` gives those back.
        """
        out = SchedulerOutput()
        step = _Step(out, budget=self.max_num_batched_tokens, batch_budget=0, queue=[])
        self._admit_waiting(step, batch=False, urgent=True)
        return out

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is and return its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it for recompute.

        It keeps its arrival order, so it resumes ahead of newer work of its class.
        """
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _batch_token_budget(self) -> int:
        """Batch tokens for this step: the allowance while interactive work is around."""
        if any(not s.priority.is_batch for s in (*self.running, *self.waiting)):
            return self.batch_token_allowance
        return self.max_num_batched_tokens

    def _schedule_running(self, step: _Step, batch: bool) -> None:
        while step.queue and step.queue[0].priority.is_batch == batch:
            seq = step.queue.pop(0)
            budget = step.batch_budget if batch else step.budget
            budget = min(budget, step.budget)
            if budget <= 0:
                continue  # keeps its blocks; runs again next step
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.block_manager.allocate(seq, num_new) is None:
                victim = step.queue.pop() if step.queue else seq
                self._preempt(step, victim)
                if victim is seq:
                    break
            else:
                step.take(seq, num_new)

    def _restore_seq_cap(self, step: _Step) -> None:
        """Preempt batch sequences holding slots past `max_num_seqs` (see schedule_urgent)."""
        while len(self.running) > self.max_num_seqs and self._preempt_batch_victim(step):
            pass

    def _admit_waiting(self, step: _Step, batch: bool, urgent: bool = False) -> None:
        while self.waiting and self.waiting[0].priority.is_batch == batch:
            seq = self.waiting[0]
            budget = min(step.batch_budget, step.budget) if batch else step.budget
            if budget <= 0:
                return
            if not (self._has_urgent_slot() if urgent else self._has_slot(batch)):
                if batch or not self._preempt_batch_victim(step):
                    return
                continue
            prefix = self.block_manager.match_prefix(seq)
            num_new = min(seq.num_tokens - prefix.num_tokens, budget)
            reserve = self.num_reserved_blocks if batch else 0
            if self.block_manager.allocate(seq, num_new, prefix, reserve) is None:
                if batch or not self._preempt_batch_victim(step):
                    return
                continue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            tag = seq.fair_tag or 0
            self._virtual_time[seq.priority] = max(self._virtual_time.get(seq.priority, 0), tag)
            step.take(seq, num_new)

    def _has_slot(self, batch: bool) -> bool:
        if len(self.running) >= self.max_num_seqs:
            return False
        if batch:
            return sum(1 for s in self.running if s.priority.is_batch) < self.max_num_batch_seqs
        return True

    def _has_urgent_slot(self) -> bool:
        """A slot for an urgent step: free, or held by batch work that can give it back."""
        num_interactive = sum(1 for s in self.running if not s.priority.is_batch)
        return num_interactive < self.max_num_seqs

    def _preempt_batch_victim(self, step: _Step) -> bool:
        """Make room for interactive work: preempt the lowest-class, newest batch sequence."""
        if not step.queue or not step.queue[-1].priority.is_batch:
            return False
        self._preempt(step, step.queue.pop())
        return True

    def _preempt(self, step: _Step, seq: Sequence) -> None:
        self.preempt(seq)
        step.out.preempted.append(seq)

    def _drop_expired(self, now_s: float) -> list[Sequence]:
        expired = [
            s
            for s in (*self.running, *self.waiting)
            if s.deadline_s is not None and now_s >= s.deadline_s
        ]
        for seq in expired:
            self.finish(seq, FinishReason.DEADLINE)
        return expired
