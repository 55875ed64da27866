"""The Triton attention backend matches the torch one; `get_attention_backend` picks by device."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    DEVICE,
    TOLERANCES,
    KernelCase,
    generator,
    make_block_tables,
    make_cache,
    num_blocks_for,
)

pytest.importorskip("triton")

from twolane.kernels.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    TritonAttentionBackend,
    get_attention_backend,
)


def _step(
    case: KernelCase, query_lens: list[int], prefix_lens: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step's Q/K/V, caches holding the prefixes, and metadata with one padding token."""
    gen = generator(seed)
    seq_lens = [q + p for q, p in zip(query_lens, prefix_lens, strict=True)]
    num_blocks = num_blocks_for(seq_lens, case.block_size)
    k_cache, v_cache = make_cache(case, num_blocks, gen)
    tables = make_block_tables(seq_lens, case.block_size, num_blocks, gen)
    slots = []
    for i, (q, p) in enumerate(zip(query_lens, prefix_lens, strict=True)):
        for pos in range(p, p + q):
            block = int(tables[i, pos // case.block_size])
            slots.append(block * case.block_size + pos % case.block_size)
    slots.append(-1)  # a padding token after the last sequence
    num_tokens = len(slots)
    query = torch.randn((num_tokens, case.num_heads, case.head_dim), generator=gen)
    key = torch.randn((num_tokens, case.num_kv_heads, case.head_dim), generator=gen)
    value = torch.randn((num_tokens, case.num_kv_heads, case.head_dim), generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor([0, *query_lens], device=DEVICE).cumsum(0).int(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    to = {"device": DEVICE, "dtype": case.dtype}
    return query.to(**to), key.to(**to), value.to(**to), k_cache, v_cache, meta


@pytest.mark.parametrize(
    ("query_lens", "prefix_lens"),
    [([1, 1, 1], [0, 20, 47]), ([9, 1, 30], [0, 33, 16]), ([12, 5], [0, 0])],
    ids=["decode", "mixed-with-prefix", "prefill"],
)
def test_triton_backend_matches_torch_backend(
    query_lens: list[int], prefix_lens: list[int]
) -> None:
    case = KernelCase(64, 4, 16, torch.float16)
    query, key, value, k_cache, v_cache, meta = _step(case, query_lens, prefix_lens, seed=0)
    query = query[: int(meta.query_start_loc[-1])]  # no query row for the padding token
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    torch_backend, triton_backend = TorchAttentionBackend(), TritonAttentionBackend()
    torch_meta = torch_backend.prepare(meta, case.block_size)
    triton_meta = triton_backend.prepare(meta, case.block_size)
    expected = torch_backend.forward(query, key, value, k_ref, v_ref, torch_meta, 0.125)
    out = triton_backend.forward(query, key, value, k_cache, v_cache, triton_meta, 0.125)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, **TOLERANCES[case.dtype])


def test_torch_on_cpu_on_request() -> None:
    assert get_attention_backend("torch", "cpu").name == "torch"


@pytest.mark.skipif(DEVICE != "cpu", reason="the kernels were built for the GPU")
def test_triton_on_cpu_runs_under_the_interpreter() -> None:
    assert get_attention_backend("triton", "cpu").name == "triton"


@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
def test_auto_picks_triton_on_cuda() -> None:
    assert get_attention_backend("auto", "cuda").name == "triton"


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_attention_backend("triton", "cpu")


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash", "cpu")
