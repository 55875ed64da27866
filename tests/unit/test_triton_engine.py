"""The engine on the Triton attention backend produces the torch backend's greedy tokens.

On CPU the kernels run in Triton's interpreter, so the run is kept small: a few
prompts, a few tokens, enough to go through decode, chunked prefill and a
prefix-cache hit.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.request import SamplingParams

SHARED_PREFIX = list(range(40, 80))  # two and a half 16-token blocks
PROMPTS = [
    [7],
    list(range(100, 137)),
    [*SHARED_PREFIX, 3, 1, 4],
    [*SHARED_PREFIX, 2, 7, 1, 8, 2],
]


def _generate(attention_backend: str) -> list[list[int]]:
    config = EngineConfig(
        model="builtin",
        attention_backend=attention_backend,
        num_blocks=64,
        # Small enough that the longer prompts are prefilled in chunks.
        max_num_batched_tokens=32,
    )
    engine = EngineCore(config)
    assert engine.runner.backend.name == attention_backend
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    # The first prompt with the shared prefix fills the prefix cache for the second.
    outputs = engine.generate(PROMPTS[:3], params)
    outputs += engine.generate(PROMPTS[3:], params)
    assert engine.stats().prefix_cache_hit_rate > 0
    assert engine.block_manager.num_used_blocks == 0
    return outputs


def test_triton_backend_generates_the_torch_backend_tokens() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels were set up for the GPU in this process")
    assert _generate("triton") == _generate("torch")
