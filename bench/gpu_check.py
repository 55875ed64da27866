"""One GPU check: kernel tests on CUDA, decode-attention speed, engine throughput.

Run on one CUDA GPU (sized for an H200, under 8 minutes):

    make gpu-check            # or: .venv/bin/python bench/gpu_check.py

1. The Triton kernel tests, compiled natively (no interpreter), with the wider
   CUDA sweep (`TWOLANE_KERNEL_DEVICE=cuda`).
2. Paged-attention decode against torch SDPA on K/V already gathered into dense
   tensors, and against the memory floor: the K/V bytes the step must read over
   the measured device-to-device copy bandwidth.
3. The engine on a random bf16 Llama (hidden 2048, 16 layers) at batch 1, 32 and
   128, in tokens/s, with the torch attention backend as the baseline.

Every section prints a markdown table; the exit status is non-zero when the
kernel tests fail or a section crashes.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL_TEST_FILES = sorted(str(p) for p in (REPO_ROOT / "tests" / "unit").glob("test_kernels_*.py"))

# A Llama-3-8B layer: 32 query heads over 8 KV heads of 128 dims.
DECODE_NUM_HEADS = 32
DECODE_NUM_KV_HEADS = 8
DECODE_HEAD_DIM = 128
DECODE_BLOCK_SIZE = 16
# (batch, context length): small batches with long contexts take the split path.
DECODE_SHAPES = [
    (1, 1024),
    (1, 8192),
    (1, 32768),
    (8, 8192),
    (32, 4096),
    (64, 2048),
    (128, 1024),
    (128, 4096),
]

ENGINE_BATCHES = (1, 32, 128)
ENGINE_BASELINE_BATCHES = (1, 32)  # the torch backend loops per sequence; keep it short
ENGINE_PROMPT_LEN = 128
ENGINE_NEW_TOKENS = 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="skip the kernel tests")
    parser.add_argument("--skip-decode", action="store_true", help="skip the decode benchmark")
    parser.add_argument("--skip-engine", action="store_true", help="skip the engine benchmark")
    parser.add_argument("--test-timeout-s", type=int, default=300)
    args = parser.parse_args()

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("gpu_check: unset TRITON_INTERPRET; this check runs the compiled kernels")
    if not torch.cuda.is_available():
        sys.exit(
            "gpu_check: needs a CUDA GPU and a CUDA build of torch; "
            f"torch {torch.__version__} reports torch.cuda.is_available() == False"
        )
    print(f"# twolane GPU check on {torch.cuda.get_device_name()} (torch {torch.__version__})\n")

    ok = True
    sections: list[tuple[str, bool, Callable[[], bool]]] = [
        ("kernel tests", args.skip_tests, lambda: run_kernel_tests(args.test_timeout_s)),
        ("decode attention", args.skip_decode, bench_decode),
        ("engine", args.skip_engine, bench_engine),
    ]
    for name, skip, section in sections:
        if skip:
            continue
        start = time.perf_counter()
        try:
            passed = section()
        except Exception:
            traceback.print_exc()
            passed = False
        ok &= passed
        status = "ok" if passed else "FAILED"
        print(f"\n_{name}: {status} in {time.perf_counter() - start:.0f} s_\n", flush=True)
    return 0 if ok else 1


# ---- 1. kernel tests --------------------------------------------------------------


def run_kernel_tests(timeout_s: int) -> bool:
    print("## Kernel tests (compiled, TWOLANE_KERNEL_DEVICE=cuda)\n", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TWOLANE_KERNEL_DEVICE"] = "cuda"
    command = [sys.executable, "-m", "pytest", *KERNEL_TEST_FILES, "-q", "-p", "no:cacheprovider"]
    try:
        result = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        print(f"kernel tests did not finish in {timeout_s} s")
        return False
    lines = (result.stdout + result.stderr).strip().splitlines()
    print("```")
    print("\n".join(lines[-40:]))
    print("```")
    return result.returncode == 0


# ---- 2. decode attention ----------------------------------------------------------


def bench_decode() -> bool:
    import torch.nn.functional as F
    from triton.testing import do_bench

    from twolane.kernels.triton_decode import num_decode_partitions, paged_attention_decode

    bandwidth = copy_bandwidth_bytes_per_s()
    print(
        f"## Decode attention: {DECODE_NUM_HEADS} heads / {DECODE_NUM_KV_HEADS} KV heads, "
        f"head_dim {DECODE_HEAD_DIM}, block {DECODE_BLOCK_SIZE}, bf16\n"
    )
    print(f"Device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s\n")
    print(
        "| batch | context | partitions | K/V MiB | triton µs | SDPA dense µs | floor µs "
        "| triton % of floor | SDPA / triton | max abs diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    dtype = torch.bfloat16
    for batch, context in DECODE_SHAPES:
        blocks_per_seq = -(-context // DECODE_BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        shape = (num_blocks, DECODE_BLOCK_SIZE, DECODE_NUM_KV_HEADS, DECODE_HEAD_DIM)
        k_cache = torch.randn(shape, device="cuda", dtype=dtype)
        v_cache = torch.randn(shape, device="cuda", dtype=dtype)
        # Shuffled blocks, as a long-running cache holds them.
        block_tables = (
            torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).to(torch.int32)
        )
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        query = torch.randn((batch, DECODE_NUM_HEADS, DECODE_HEAD_DIM), device="cuda", dtype=dtype)
        out = torch.empty_like(query)
        scale = DECODE_HEAD_DIM**-0.5

        run_triton = functools.partial(
            paged_attention_decode,
            query,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            scale,
            max_seq_len=context,
            out=out,
        )
        key = dense_kv(k_cache, block_tables, context)
        value = dense_kv(v_cache, block_tables, context)
        run_sdpa = functools.partial(
            F.scaled_dot_product_attention,
            query.unsqueeze(2),  # [batch, heads, 1, head_dim]
            key,
            value,
            scale=scale,
            enable_gqa=True,
        )

        run_triton()
        expected = run_sdpa().squeeze(2)
        diff = (out.float() - expected.float()).abs().max().item()
        ok &= diff < 2e-2
        triton_s = do_bench(run_triton) * 1e-3
        sdpa_s = do_bench(run_sdpa) * 1e-3
        kv_bytes = 2 * batch * context * DECODE_NUM_KV_HEADS * DECODE_HEAD_DIM * dtype.itemsize
        floor_s = kv_bytes / bandwidth
        _, num_partitions = num_decode_partitions(batch, DECODE_NUM_KV_HEADS, context, None)
        print(
            f"| {batch} | {context} | {num_partitions} | {kv_bytes / 2**20:.0f} "
            f"| {triton_s * 1e6:.1f} | {sdpa_s * 1e6:.1f} | {floor_s * 1e6:.1f} "
            f"| {100 * floor_s / triton_s:.0f}% | {sdpa_s / triton_s:.2f} | {diff:.1e} |",
            flush=True,
        )
        del k_cache, v_cache, key, value
        torch.cuda.empty_cache()
    return ok


def dense_kv(cache: torch.Tensor, block_tables: torch.Tensor, context: int) -> torch.Tensor:
    """Gather the paged cache into [batch, num_kv_heads, context, head_dim], as SDPA wants."""
    batch = block_tables.shape[0]
    blocks = cache[block_tables.long()]  # [batch, blocks_per_seq, block_size, kv_heads, dim]
    tokens = blocks.reshape(batch, -1, cache.shape[2], cache.shape[3])[:, :context]
    return tokens.transpose(1, 2).contiguous()


def copy_bandwidth_bytes_per_s(num_bytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth, counting the read and the write."""
    from triton.testing import do_bench

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds: float = do_bench(functools.partial(dst.copy_, src)) * 1e-3
    return 2 * num_bytes / seconds


# ---- 3. engine ----------------------------------------------------------------------


def bench_engine() -> bool:
    from twolane.scheduler.config import EngineConfig
    from twolane.scheduler.engine import EngineCore
    from twolane.scheduler.request import SamplingParams

    print(
        f"## Engine: random Llama, hidden 2048, 16 layers, bf16; prompts of "
        f"{ENGINE_PROMPT_LEN} tokens, {ENGINE_NEW_TOKENS} new tokens each\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="twolane-gpu-check-") as tmp:
        model_dir = make_random_llama(Path(tmp) / "llama")
        params = SamplingParams(max_tokens=ENGINE_NEW_TOKENS, ignore_eos=True)
        results: dict[str, dict[int, float]] = {}
        for backend in ("triton", "torch"):
            batches = ENGINE_BATCHES if backend == "triton" else ENGINE_BASELINE_BATCHES
            config = EngineConfig(
                model=str(model_dir),
                dtype="bfloat16",
                device="cuda",
                kv_cache_bytes=8 * 2**30,
                max_num_seqs=max(ENGINE_BATCHES),
                max_num_batched_tokens=8192,
                enable_prefix_caching=False,
                attention_backend=backend,
            )
            engine = EngineCore(config)
            # Compile the kernels and fill allocator caches before timing.
            warmup = SamplingParams(max_tokens=4, ignore_eos=True)
            engine.generate(random_prompts(2, engine.vocab_size, seed=99), warmup)
            results[backend] = {}
            for batch in batches:
                prompts = random_prompts(batch, engine.vocab_size, seed=batch)
                torch.cuda.synchronize()
                start = time.perf_counter()
                outputs = engine.generate(prompts, params)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                num_new = sum(len(o) for o in outputs)
                if num_new != batch * ENGINE_NEW_TOKENS:
                    raise RuntimeError(f"{backend} batch {batch}: {num_new} tokens generated")
                results[backend][batch] = num_new / elapsed
                print(f"{backend} batch {batch}: {elapsed:.2f} s", flush=True)
            del engine
            torch.cuda.empty_cache()

    print("\n| batch | triton tok/s | torch tok/s | triton / torch |")
    print("|---:|---:|---:|---:|")
    for batch in ENGINE_BATCHES:
        fast = results["triton"][batch]
        base = results["torch"].get(batch)
        if base is None:
            print(f"| {batch} | {fast:.0f} | — | — |")
        else:
            print(f"| {batch} | {fast:.0f} | {base:.0f} | {fast / base:.2f} |")
    return True


def make_random_llama(model_dir: Path, device: str = "cuda", **overrides: int) -> Path:
    """A random bf16 Llama checkpoint (Llama-3.2-1B shape, 32k vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from twolane.models.builtin import builtin_model_dir

    # LlamaConfig's keywords are typed one by one; these are some of them.
    shape: dict[str, Any] = {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
    }
    config = LlamaConfig(**{**shape, **overrides}, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds, not minutes
        model = LlamaForCausalLM(config)
    # transformers wraps PreTrainedModel.to with functools.wraps, which mypy types as
    # an unbound function of the model.
    model.to(torch.bfloat16).save_pretrained(  # type: ignore[arg-type]
        model_dir, safe_serialization=True
    )
    del model
    torch.cuda.empty_cache()
    # The engine reads tokenizer.json even when given token ids.
    shutil.copy(builtin_model_dir() / "tokenizer.json", model_dir / "tokenizer.json")
    return model_dir


def random_prompts(batch: int, vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, ENGINE_PROMPT_LEN), generator=gen).tolist()


if __name__ == "__main__":
    sys.exit(main())
