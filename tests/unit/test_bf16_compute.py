"""bfloat16 on CPU: matmuls in bfloat16 where the CPU has them natively, else in float32
over a bfloat16 KV cache; either way the engine serves."""

from __future__ import annotations

import pytest
import torch

from twolane.models.loader import compute_dtype, native_bf16_matmuls
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import SamplingParams


def test_auto_follows_the_cpu() -> None:
    expected = "bfloat16" if native_bf16_matmuls() else "float32"
    assert compute_dtype("bfloat16", "cpu") == expected


@pytest.mark.parametrize(
    ("dtype", "device", "choice", "expected"),
    [
        ("float32", "cpu", "auto", "float32"),
        ("bfloat16", "cpu", "float32", "float32"),
        ("bfloat16", "cpu", "bfloat16", "bfloat16"),
        ("bfloat16", "cuda", "auto", "bfloat16"),
        ("float16", "cuda", "float32", "float16"),
    ],
)
def test_only_bfloat16_on_cpu_can_compute_in_float32(
    dtype: str, device: str, choice: str, expected: str
) -> None:
    assert compute_dtype(dtype, device, choice) == expected


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="bf16_compute"):
        EngineConfig(bf16_compute="float16")


@pytest.mark.parametrize("choice", ["bfloat16", "float32"])
def test_both_ways_serve_a_bfloat16_cache(choice: str) -> None:
    engine = EngineCore(
        EngineConfig(model="builtin", dtype="bfloat16", bf16_compute=choice, num_blocks=32)
    )
    fp32 = EngineCore(EngineConfig(model="builtin", num_blocks=32))
    prompt = [[ord(c) for c in "Hello there"]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = engine.generate(prompt, greedy)[0]
    assert len(out) == 6
    assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert engine.runner.model.lm_head.weight.dtype == getattr(torch, choice)
    # Wide logit gaps in the built-in model keep the first greedy token stable across dtypes.
    assert out[0] == fp32.generate(prompt, greedy)[0][0]
