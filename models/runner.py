"""Runs one step: packs the batch, runs the model, samples the next tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from twolane.kernels.attention import AttentionBackend, AttentionMetadata
from twolane.models.batch import BatchSequence, ForwardHook, SamplingRow
from twolane.models.config import ModelConfig
from twolane.models.llama import KVCache, LlamaForCausalLM
from twolane.models.sampling import sample


@dataclass(frozen=True)
class StepResult:
    """One sampled token per sequence of the step that had `sampling` set, in step order,
    and where the step's time went (a nested step's time counts in its outer forward)."""

    token_ids: list[int]
    logprobs: list[float] | None
    prepare_s: float
    forward_s: float
    sample_s: float


@dataclass(frozen=True)
class _Inputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int]  # flat token index of each sampling sequence's last token
    sampling: list[SamplingRow]


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
    def execute(self, batch: list[BatchSequence], hook: ForwardHook | None = None) -> StepResult:
        """Run one step. `hook` may run another step of its own (on other sequences)
        between two layers of this one."""
        started_s = time.perf_counter()
        inputs = self._prepare(batch)
        prepared_s = time.perf_counter()
        hidden = self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend, hook
        )
        forwarded_s = time.perf_counter()
        if not inputs.sample_rows:
            return StepResult([], None, prepared_s - started_s, forwarded_s - prepared_s, 0.0)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        result = sample(logits, inputs.sampling)
        return StepResult(
            result.token_ids,
            result.logprobs,
            prepare_s=prepared_s - started_s,
            forward_s=forwarded_s - prepared_s,
            sample_s=time.perf_counter() - forwarded_s,
        )

    def _prepare(self, batch: list[BatchSequence]) -> _Inputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling: list[SamplingRow] = []
        bs = self.block_size
        for seq in batch:
            start = seq.num_computed_tokens
            end = start + len(seq.token_ids)
            input_ids.extend(seq.token_ids)
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            if seq.sampling is not None:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(seq.sampling)
        max_blocks = max(len(s.block_table) for s in batch)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch]

        def tensor(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(query_start_loc, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(tables, torch.int32),
            max_query_len=max(len(s.token_ids) for s in batch),
            max_seq_len=max(seq_lens),
        )
        return _Inputs(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            meta=self.backend.prepare(meta, bs),
            sample_rows=sample_rows,
            sampling=sampling,
        )
