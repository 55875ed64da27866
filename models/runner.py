"""Runs one scheduled step: packs the batch, runs the model, samples the next tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from twolane.kernels.attention import AttentionBackend, AttentionMetadata
from twolane.models.config import ModelConfig
from twolane.models.llama import KVCache, LlamaForCausalLM
from twolane.models.sampling import sample
from twolane.scheduler.block_manager import BlockCopy
from twolane.scheduler.scheduler import ScheduledSequence


@dataclass(frozen=True)
class StepResult:
    """Sampled tokens for the scheduled sequences that reached their last token this step."""

    request_ids: list[str]
    token_ids: list[int]
    logprobs: list[float] | None


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        model_config: ModelConfig,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.backend = backend
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches: list[KVCache] = [
            (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in range(model_config.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_layer = 2 * block_size * model_config.num_kv_heads * model_config.head_dim * elem
        return per_layer * model_config.num_layers

    @torch.inference_mode()
    def execute(
        self,
        scheduled: list[ScheduledSequence],
        between_layers: Callable[[], None] | None = None,
    ) -> StepResult:
        """Run one step. `between_layers` may run another step of its own (on other
        sequences) between two layers of this one."""
        input_ids, positions, meta, sample_rows, sampling = self._prepare(scheduled)
        hidden = self.model(
            input_ids, positions, self.kv_caches, meta, self.backend, between_layers
        )
        if not sample_rows:
            return StepResult([], [], None)
        logits = self.model.compute_logits(hidden[sample_rows])
        seqs = [s.seq for s in sampling]
        result = sample(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            want_logprobs=any(s.params.logprobs for s in seqs),
        )
        return StepResult([s.request_id for s in seqs], result.token_ids, result.logprobs)

    @torch.inference_mode()
    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        for copy in copies:
            for k_cache, v_cache in self.kv_caches:
                k_cache[copy.dst] = k_cache[copy.src]
                v_cache[copy.dst] = v_cache[copy.src]

    def _prepare(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[ScheduledSequence]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledSequence] = []
        bs = self.block_size
        for item in scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(item)
        max_blocks = max(len(s.seq.block_table) for s in scheduled)
        tables = [
            s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in scheduled
        ]

        def tensor(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(query_start_loc, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(tables, torch.int32),
            max_query_len=max(s.num_new_tokens for s in scheduled),
            max_seq_len=max(seq_lens),
        )
        return (
            tensor(input_ids, torch.int64),
            tensor(positions, torch.int64),
            meta,
            sample_rows,
            sampling,
        )
