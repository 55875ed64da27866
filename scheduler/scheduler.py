"""Iteration-level continuous batching over the paged KV cache.

Every step the scheduler builds one batch under a token budget and a sequence cap:
running sequences first (decodes, and the next chunk of prefills still in
progress), then waiting ones, best priority class first and first come first served
inside a class. A long prompt is prefilled in chunks across steps, side by side
with other sequences' decodes. When the cache runs out of blocks, the lowest-class,
newest running sequence is preempted: its blocks are freed and it is recomputed
later (the prefix cache often still holds most of it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from twolane.scheduler.block_manager import BlockManager
from twolane.scheduler.request import FinishReason, Priority
from twolane.scheduler.sequence import Sequence, SequenceStatus


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


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_waiting_of(self, priority: Priority) -> int:
        return sum(1 for s in self.waiting if s.priority is priority)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq)

    def schedule(self, now_s: float) -> SchedulerOutput:
        out = SchedulerOutput(expired=self._drop_expired(now_s))
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        # Admitting new work right after preempting would only thrash the cache.
        if not out.preempted:
            self._schedule_waiting(out, budget)
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
        """Free a running sequence's blocks and queue it for recompute."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        queue = sorted(self.running, key=lambda s: s.sort_key)
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.block_manager.allocate(seq, num_new) is None:
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.block_manager.match_prefix(seq)
            num_new = min(seq.num_tokens - prefix.num_tokens, budget)
            if self.block_manager.allocate(seq, num_new, prefix) is None:
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def _drop_expired(self, now_s: float) -> list[Sequence]:
        expired = [
            s
            for s in (*self.running, *self.waiting)
            if s.deadline_s is not None and now_s >= s.deadline_s
        ]
        for seq in expired:
            self.finish(seq, FinishReason.DEADLINE)
        return expired

    def _enqueue(self, seq: Sequence) -> None:
        keys = [s.sort_key for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.sort_key), seq)
