"""The Triton KV-cache store writes exactly what `store_kv_cache_ref` writes."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, KernelCase, generator, kernel_cases

pytest.importorskip("triton")

from twolane.kernels.reference import store_kv_cache_ref
from twolane.kernels.triton_store import store_kv_cache

CASES = kernel_cases()


def _poisoned_caches(case: KernelCase, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    # NaN everywhere: a slot the kernel writes by mistake, or fails to write, shows up.
    shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=case.dtype, device=DEVICE)
    return k_cache, k_cache.clone()


def _check_store(
    case: KernelCase,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_blocks: int,
    rtol: float = 0.0,
) -> None:
    k_cache, v_cache = _poisoned_caches(case, num_blocks)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv_cache_ref(key, value, k_expected, v_expected, slot_mapping)
    store_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    torch.testing.assert_close(k_cache, k_expected, rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_expected, rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_store_writes_each_token_to_its_slot_and_skips_padding(case: KernelCase) -> None:
    gen = generator(0)
    num_blocks = 6
    num_slots = num_blocks * case.block_size
    num_tokens = 2 * case.block_size + 3
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[[1, num_tokens - 2]] = -1  # padding tokens
    shape = (num_tokens, case.num_kv_heads, case.head_dim)
    key = torch.randn(shape, generator=gen).to(DEVICE, case.dtype)
    value = torch.randn(shape, generator=gen).to(DEVICE, case.dtype)
    _check_store(case, key, value, slots.to(DEVICE), num_blocks)


def test_store_reads_key_and_value_through_their_strides() -> None:
    # The model hands over K and V as views into one fused QKV projection.
    case = KernelCase(64, 4, 16, torch.float16)
    gen = generator(1)
    num_tokens = 20
    kv_width = case.num_kv_heads * case.head_dim
    qkv = torch.randn((num_tokens, case.num_heads * case.head_dim + 2 * kv_width), generator=gen)
    qkv = qkv.to(DEVICE, case.dtype)
    q_width = case.num_heads * case.head_dim
    key = qkv[:, q_width : q_width + kv_width].view(num_tokens, case.num_kv_heads, case.head_dim)
    value = qkv[:, q_width + kv_width :].view(num_tokens, case.num_kv_heads, case.head_dim)
    assert not key.is_contiguous()
    slots = torch.arange(num_tokens, dtype=torch.int64, device=DEVICE) * 3
    _check_store(case, key, value, slots, num_blocks=4)


def test_store_converts_to_the_cache_dtype() -> None:
    case = KernelCase(128, 1, 8, torch.bfloat16, num_kv_heads=3)
    gen = generator(2)
    key = torch.randn((5, 3, 128), generator=gen).to(DEVICE)
    value = torch.randn((5, 3, 128), generator=gen).to(DEVICE)
    slots = torch.tensor([0, 9, -1, 31, 17], dtype=torch.int64, device=DEVICE)
    # One bf16 step: Triton's interpreter truncates where the GPU rounds to nearest.
    _check_store(case, key, value, slots, num_blocks=4, rtol=2**-7)


def test_store_of_only_padding_leaves_the_cache_untouched() -> None:
    case = KernelCase(64, 1, 16, torch.float32)
    key = torch.ones((4, 2, 64), device=DEVICE)
    slots = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    _check_store(case, key, key, slots, num_blocks=2)


def test_store_rejects_a_cache_of_another_head_shape() -> None:
    key = torch.ones((4, 2, 64), device=DEVICE)
    cache = torch.zeros((2, 16, 2, 128), device=DEVICE)
    slots = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="does not hold"):
        store_kv_cache(key, key, cache, cache.clone(), slots)
