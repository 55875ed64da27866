"""The native CPU attention op (csrc/cpu_attention.cpp): built ahead of time, loaded by path.

`make setup` runs `python -m twolane.kernels.native build`, which compiles the op with
`torch.utils.cpp_extension` for this CPU's instruction set (AVX2+FMA or AVX-512; `--isa`
builds others too) into a directory under the virtual environment. A server never compiles: it
loads the library built for its CPU's instruction set (`torch.backends.cpu`), or, when
there is none (no compiler at setup, an older build of the source, a CPU without AVX2),
says why and serves with the torch attention path instead.

Library names carry a digest of the source, the flags and the torch version, so a stale
build is never loaded.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_attention.cpp"
COMMON_FLAGS = ("-O3", "-fno-math-errno", "-DNDEBUG", "-Wno-unknown-pragmas")
# The flags of each instruction set; CPU_CAPABILITY picks at::vec's implementation.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
    "AVX512": (
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ),
}
OPS_DIR_ENV = "TWOLANE_OPS_DIR"


def ops_dir() -> Path:
    """Where built libraries live: $TWOLANE_OPS_DIR, else beside this interpreter's env."""
    override = os.environ.get(OPS_DIR_ENV)
    return Path(override) if override else Path(sys.prefix) / "twolane-ops"


def library_name(isa: str) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(COMMON_FLAGS + ISA_FLAGS[isa]).encode())
    digest.update(torch.__version__.encode())
    return f"twolane_cpu_attention_{isa.lower()}_{digest.hexdigest()[:12]}"


def library_path(isa: str) -> Path:
    name = library_name(isa)
    return ops_dir() / name / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"


def cpu_isa() -> str | None:
    """The instruction set to run on this CPU: AVX512, AVX2, or None (neither)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "AVX512"
    if capability == "AVX2":
        return "AVX2"
    return None


def build(isa: str) -> Path:
    """Compile the op for `isa` (if not built already) and return the library's path.

    Builds through setuptools and `torch.utils.cpp_extension.BuildExtension`, which only
    compiles: a library for an instruction set this CPU lacks must never be loaded here.

    Raises:
        Exception: the compiler failed or is missing (setuptools raises several types).
    """
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    path = library_path(isa)
    if path.is_file():
        return path
    name = library_name(isa)
    extension = CppExtension(
        name=name, sources=[str(SOURCE)], extra_compile_args=[*COMMON_FLAGS, *ISA_FLAGS[isa]]
    )
    dist = Distribution(
        {
            "name": name,
            "ext_modules": [extension],
            "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
        }
    )
    command = dist.get_command_obj("build_ext")
    command.build_lib = str(path.parent)
    command.build_temp = str(path.parent / "build")
    # The ninja that pip installed sits beside this interpreter, maybe not on PATH.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    dist.run_command("build_ext")
    if not path.is_file():
        raise RuntimeError(f"the build finished without writing {path}")
    _remove_stale_builds(isa)
    return path


def _remove_stale_builds(isa: str) -> None:
    """Builds of older sources for `isa`: never loaded again (their digest differs)."""
    current = library_name(isa)
    prefix = current.rsplit("_", 1)[0] + "_"
    for old in ops_dir().glob(prefix + "*"):
        if old.name != current and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class NativeOps:
    """The loaded op: `torch.ops.twolane_cpu`, with what it was built for."""

    isa: str
    vector_lanes: int
    path: Path

    def paged_decode(
        self,
        out: torch.Tensor,  # [num_tokens, num_heads, head_dim]; rows `rows` are written
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
        seq_lens: torch.Tensor,  # [num_seqs] int32
        rows: torch.Tensor,  # [num_seqs] int32: each sequence's query row
        scale: float,
        partition_size: int = 0,  # context tokens per partition; 0 picks from the thread count
    ) -> None:
        torch.ops.twolane_cpu.paged_decode(
            out, query, k_cache, v_cache, block_tables, seq_lens, rows, scale, partition_size
        )

    def store_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = padding
    ) -> None:
        torch.ops.twolane_cpu.store_kv(key, value, k_cache, v_cache, slot_mapping)

    def supports(self, head_dim: int, dtype: torch.dtype) -> bool:
        return head_dim % self.vector_lanes == 0 and dtype in (torch.float32, torch.bfloat16)


class NativeUnavailable(Exception):
    """Why the native op cannot run here (the engine logs it and uses torch attention)."""


@functools.cache
def load() -> NativeOps:
    """Load the op built for this CPU, once per process.

    Raises:
        NativeUnavailable: no AVX2 on this CPU, or no library built for this source.
    """
    isa = cpu_isa()
    if isa is None:
        capability = torch.backends.cpu.get_cpu_capability()
        raise NativeUnavailable(f"this CPU has neither AVX2 nor AVX-512 ({capability})")
    path = library_path(isa)
    if not path.is_file():
        raise NativeUnavailable(
            f"no {isa} build of {SOURCE.name} for this source at {path}; "
            "build it with `make setup` (python -m twolane.kernels.native build)"
        )
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise NativeUnavailable(f"{path} does not load: {e}") from None
    ops = torch.ops.twolane_cpu
    return NativeOps(isa=ops.isa(), vector_lanes=ops.vector_lanes(), path=path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the native CPU attention op.")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="compile for this CPU's instruction set")
    build_cmd.add_argument(
        "--isa", choices=sorted(ISA_FLAGS), action="append", help="build for this one (repeatable)"
    )
    args = parser.parse_args(argv)
    here = cpu_isa()
    # A library for an instruction set this CPU lacks cannot be loaded (or tested) here:
    # build it only when asked.
    for isa in args.isa or ([here] if here else []):
        try:
            path = build(isa)
        except Exception as e:  # a compiler failure has many types; report each and go on
            print(f"native CPU attention op: {isa} build failed: {e}", file=sys.stderr)
            continue
        print(f"native CPU attention op: {isa} built at {path}")
    if here is None or not library_path(here).is_file():
        print(
            f"native CPU attention op: nothing to run on this CPU ({here or 'no AVX2'}); "
            "the engine will use torch attention",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
