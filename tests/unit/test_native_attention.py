"""The native CPU attention op equals the torch reference; the backend picks it on CPU.

The op is built by `make setup`. Where this machine could build it (a C++ compiler and
an AVX2 CPU) and it does not load, these tests fail rather than skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import structlog
import torch
from kernel_cases import generator, make_block_tables, poisoned_like

from twolane.kernels import native
from twolane.kernels.attention import (
    AttentionMetadata,
    NativeAttentionBackend,
    TorchAttentionBackend,
    get_attention_backend,
)
from twolane.kernels.reference import (
    paged_attention_decode_ref,
    paged_prefill_attention_ref,
    store_kv_cache_ref,
)
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore

TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture(scope="module")
def ops() -> native.NativeOps:
    try:
        return native.load()
    except native.NativeUnavailable as e:
        if native.cpu_isa() is None or shutil.which("c++") is None:
            pytest.skip(f"the native op cannot be built here: {e}")
        pytest.fail(f"the native op should load here: {e}")


def _decode_inputs(
    head_dim: int,
    group: int,
    block_size: int,
    dtype: torch.dtype,
    seq_lens: list[int],
    num_kv_heads: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Caches, shuffled block tables, and queries on rows scattered among extra rows."""
    gen = generator(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = len(seq_lens) + 3
    return {
        "query": torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype),
        "k_cache": torch.randn(shape, generator=gen).to(dtype),
        "v_cache": torch.randn(shape, generator=gen).to(dtype),
        "block_tables": make_block_tables(seq_lens, block_size, num_blocks, gen),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "rows": torch.randperm(num_tokens, generator=gen)[: len(seq_lens)].int(),
    }


def _check_decode(ops: native.NativeOps, inputs: dict[str, torch.Tensor], partition: int) -> None:
    query, rows = inputs["query"], inputs["rows"]
    scale = query.shape[-1] ** -0.5
    out = poisoned_like(query)
    ops.paged_decode(
        out,
        query,
        inputs["k_cache"],
        inputs["v_cache"],
        inputs["block_tables"],
        inputs["seq_lens"],
        rows,
        scale,
        partition,
    )
    expected = paged_attention_decode_ref(
        query[rows.long()],
        inputs["k_cache"],
        inputs["v_cache"],
        inputs["block_tables"],
        inputs["seq_lens"],
        scale,
    )
    torch.testing.assert_close(out[rows.long()], expected, **TOLERANCES[query.dtype])
    others = torch.ones(query.shape[0], dtype=torch.bool)
    others[rows.long()] = False
    assert out[others].isnan().all(), "rows of no sequence must stay untouched"


def _ragged(block_size: int) -> list[int]:
    return [1, block_size, 2 * block_size + 3, 37, 100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 3, 4, 8, 12])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_decode_matches_reference_on_ragged_contexts(
    ops: native.NativeOps, head_dim: int, group: int, block_size: int, dtype: torch.dtype
) -> None:
    # group 12 is more query heads than one item serves: two slices per KV head.
    inputs = _decode_inputs(head_dim, group, block_size, dtype, _ragged(block_size))
    _check_decode(ops, inputs, partition=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("partition", [32, 96, 512])
def test_decode_split_into_partitions_matches_reference(
    ops: native.NativeOps, partition: int, dtype: torch.dtype
) -> None:
    # Partitions that end mid-block and mid-chunk; contexts shorter than one partition.
    inputs = _decode_inputs(64, 3, 16, dtype, [1, 700, 2000, 300, 31], num_kv_heads=3)
    _check_decode(ops, inputs, partition)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_on_two_threads_splits_long_contexts_and_matches(
    ops: native.NativeOps, dtype: torch.dtype
) -> None:
    # One sequence, 3 KV heads: too few items for two threads, so the op partitions.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_decode(ops, _decode_inputs(64, 3, 16, dtype, [2000], num_kv_heads=3), 0)
        _check_decode(ops, _decode_inputs(64, 3, 16, dtype, [2000, 5, 900], num_kv_heads=3), 0)
    finally:
        torch.set_num_threads(threads)


def _lengths_across_blocks(batch: int, block_size: int, seed: int) -> list[int]:
    """Ragged lengths: one block exactly, one token past it, and random ones up to 4 blocks."""
    gen = generator(seed)
    fixed = [block_size, block_size + 1, 1]
    randoms = torch.randint(1, 4 * block_size + 6, (batch,), generator=gen).tolist()
    return (fixed + randoms)[:batch]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [8, 64])
@pytest.mark.parametrize("num_kv_heads", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_decode_matches_reference_over_batch_sizes_and_kv_heads(
    ops: native.NativeOps, batch: int, num_kv_heads: int, block_size: int, dtype: torch.dtype
) -> None:
    # Many sequences give an item every KV head of a row; few split the heads over items.
    lengths = _lengths_across_blocks(batch, block_size, seed=batch + num_kv_heads)
    inputs = _decode_inputs(64, 2, block_size, dtype, lengths, num_kv_heads=num_kv_heads)
    _check_decode(ops, inputs, partition=0)


def test_decode_of_float32_queries_over_a_bfloat16_cache(ops: native.NativeOps) -> None:
    # bfloat16 caches under float32 compute: queries and outputs stay float32.
    inputs = _decode_inputs(64, 3, 16, torch.bfloat16, _ragged(16), num_kv_heads=2)
    # Off the bfloat16 grid, so that a query rounded to the cache's dtype would show.
    inputs["query"] = inputs["query"].float() + 1e-3
    _check_decode(ops, inputs, partition=0)
    _check_decode(ops, inputs, partition=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_reads_a_strided_query(ops: native.NativeOps, dtype: torch.dtype) -> None:
    # Query heads further apart than head_dim: a slice of a wider tensor.
    inputs = _decode_inputs(64, 2, 16, dtype, _ragged(16))
    query = inputs["query"]
    wide = torch.full((*query.shape[:2], 2 * query.shape[2]), float("nan"), dtype=dtype)
    wide[..., : query.shape[2]] = query
    inputs["query"] = wide[..., : query.shape[2]]
    assert inputs["query"].stride(1) != query.shape[2]
    _check_decode(ops, inputs, partition=0)


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_on_any_thread_count_matches(ops: native.NativeOps, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = _decode_inputs(64, 4, 16, torch.float32, [700, *_ragged(16)], num_kv_heads=2)
        _check_decode(ops, inputs, partition=0)
    finally:
        torch.set_num_threads(before)


def test_decode_refuses_a_block_outside_the_cache(ops: native.NativeOps) -> None:
    inputs = _decode_inputs(64, 2, 16, torch.float32, [40])
    inputs["block_tables"][0, 1] = inputs["k_cache"].shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        _check_decode(ops, inputs, partition=0)


def test_decode_refuses_a_context_longer_than_its_table(ops: native.NativeOps) -> None:
    inputs = _decode_inputs(64, 2, 16, torch.float32, [40])
    inputs["seq_lens"][0] = 16 * inputs["block_tables"].shape[1] + 1
    with pytest.raises(RuntimeError, match="needs more blocks"):
        _check_decode(ops, inputs, partition=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_store_kv_matches_reference_and_skips_padding(
    ops: native.NativeOps, dtype: torch.dtype
) -> None:
    gen = generator(3)
    num_kv_heads, head_dim = 2, 32
    # K and V as the model makes them: strided column slices of one fused projection.
    fused = torch.randn(5, 4 * num_kv_heads * head_dim, generator=gen).to(dtype)
    key = fused[:, : num_kv_heads * head_dim].view(5, num_kv_heads, head_dim)
    value = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(
        5, num_kv_heads, head_dim
    )
    slots = torch.tensor([3, -1, 17, 0, 40], dtype=torch.int64)
    caches = [torch.zeros(6, 8, num_kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    ops.store_kv(key, value, caches[0], caches[1], slots)
    store_kv_cache_ref(key, value, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[0], caches[2], rtol=0, atol=0)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0)


def test_store_kv_refuses_a_slot_outside_the_cache(ops: native.NativeOps) -> None:
    key = torch.randn(1, 2, 32)
    cache = torch.zeros(2, 8, 2, 32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.store_kv(key, key, cache, cache.clone(), torch.tensor([16]))


def _mixed_step(
    dtype: torch.dtype, block_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Decodes, a fresh prefill, and a chunk after a cached prefix, plus a padding token."""
    gen = generator(seed)
    num_kv_heads, group, head_dim = 2, 3, 64
    query_lens = [1, 9, 1, 6, 1]
    prefix_lens = [20, 0, 47, 33, 0]
    seq_lens = [q + p for q, p in zip(query_lens, prefix_lens, strict=True)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    tables = make_block_tables(seq_lens, block_size, num_blocks, gen)
    slots = []
    for i, (q, p) in enumerate(zip(query_lens, prefix_lens, strict=True)):
        slots += [int(tables[i, pos // block_size]) * block_size + pos % block_size
                  for pos in range(p, p + q)]  # fmt: skip
    slots.append(-1)
    num_tokens = len(slots)
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor([0, *query_lens]).cumsum(0).int(),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )
    return query, kv[:, 0], kv[:, 1], k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [4, 16])
def test_native_backend_matches_torch_backend_and_reference_on_a_mixed_step(
    ops: native.NativeOps, dtype: torch.dtype, block_size: int
) -> None:
    query, key, value, k_cache, v_cache, meta = _mixed_step(dtype, block_size, seed=block_size)
    num_real = int(meta.query_start_loc[-1])
    query = query[:num_real]  # no query row for the padding token
    k_torch, v_torch = k_cache.clone(), v_cache.clone()
    native_backend, torch_backend = NativeAttentionBackend(ops), TorchAttentionBackend()
    out = native_backend.forward(
        query, key, value, k_cache, v_cache, native_backend.prepare(meta, block_size), 0.125
    )
    expected = torch_backend.forward(
        query, key, value, k_torch, v_torch, torch_backend.prepare(meta, block_size), 0.125
    )
    torch.testing.assert_close(k_cache, k_torch, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_torch, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    reference = paged_prefill_attention_ref(
        query, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, 0.125
    )
    torch.testing.assert_close(out, reference, **TOLERANCES[dtype])


def test_auto_picks_native_on_cpu(ops: native.NativeOps) -> None:
    backend = get_attention_backend("auto", "cpu", head_dim=64, dtype=torch.bfloat16)
    assert backend.name == "native"


def test_auto_keeps_torch_for_a_head_dim_the_op_does_not_take(ops: native.NativeOps) -> None:
    backend = get_attention_backend(
        "auto", "cpu", head_dim=ops.vector_lanes + 1, dtype=torch.float32
    )
    assert isinstance(backend, TorchAttentionBackend)
    assert "head_dim" in (backend.fallback_reason or "")


@pytest.fixture
def no_native_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A build directory with nothing in it, as after a failed build."""
    monkeypatch.setenv(native.OPS_DIR_ENV, str(tmp_path))
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def test_without_a_build_auto_falls_back_to_torch_and_says_why(no_native_build: None) -> None:
    backend = get_attention_backend("auto", "cpu")
    assert isinstance(backend, TorchAttentionBackend)
    assert "make setup" in (backend.fallback_reason or "")
    with pytest.raises(ValueError, match="'native' cannot run here"):
        get_attention_backend("native", "cpu")


def test_without_a_build_the_engine_serves_on_torch_and_logs_it(no_native_build: None) -> None:
    with structlog.testing.capture_logs() as logs:
        engine = EngineCore(EngineConfig(model="builtin", num_blocks=16))
    assert engine.runner.backend.name == "torch"
    warnings = [e for e in logs if e["event"] == "native_attention_unavailable"]
    assert warnings and warnings[0]["using"] == "torch"
    assert "make setup" in warnings[0]["reason"]
