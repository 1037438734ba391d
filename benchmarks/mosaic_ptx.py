"""The Mosaic GPU kernels as compiled for an H100/H200, on a machine without a GPU.

    .venv-gpu-compile/bin/python benchmarks/mosaic_ptx.py [--dtypes float32 bfloat16 complex64]
        [--widths 128 32] [--variants default "auto barriers"] [--length 4096] [--tag _sm90]

Needs JAX's CUDA plugin (``make gpu-compile-env``), no GPU: with ``JAX_PLATFORMS=cpu`` and a
deviceless H200 (``benchmarks/gpu_compile.py``'s), XLA compiles
``linear_recurrence(method="pallas")`` forward+backward with
``streaming_options(backend="mosaic_gpu")``, and Mosaic GPU lowers each kernel to PTX and runs
``ptxas`` for ``sm_90a``. Each case runs in a child process whose Mosaic GPU writes every
kernel's PTX and ``ptxas`` report to a folder (``MOSAIC_GPU_DUMP_TO``). Per kernel it reports
what ``ptxas`` says (registers, spilled bytes, named barriers) and counts in the PTX: warpgroup
barriers (``bar.sync``), shared-memory loads and stores, TMA copies in and out, and the
floating-point operations. The PTX is straight-line per block: each block's ``block_rows`` time
steps are unrolled in a loop over blocks, so ``*_per_row`` divides a count by the rows of a
block (the prologue and epilogue included: an upper bound on the loop's own).

Variants: ``default`` (the kernels as they run), ``auto barriers``
(``StreamingOptions.auto_barriers``: Mosaic GPU's barrier before and after every shared-memory
store). Widths: 128 channels of one batch row per program (inputs (8, L, 512)), 64 of 2 or 32
of 4 (``mosaic_gpu_recurrence.program_width``; inputs (8, L, width)).

This is what the compiler emits, not a timing: ``pallas_gpu.py`` times the kernels on a GPU.
Results: ``benchmarks/results/mosaic_ptx[TAG]_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Compiled for a GPU, never run on one; set before benchmarks.common imports JAX, whose CUDA
# plugin otherwise fails its start-up check on a machine without a GPU (gpu_compile.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks.common import format_table, write_results

BATCH = 8
VARIANTS: dict[str, dict[str, Any]] = {"default": {}, "auto barriers": {"auto_barriers": True}}
COLUMNS = [
    "variant",
    "dtype",
    "width",
    "kernel",
    "registers",
    "spill_bytes",
    "bar_sync",
    "bar_sync_per_row",
    "shared_loads_per_row",
    "shared_stores_per_row",
    "tma_in",
    "tma_out",
    "float_ops_per_row",
]
# PTX instructions counted, by a pattern their opcode starts with. The TMA copies are tensor
# copies, or plain bulk copies where the window is contiguous.
_COUNTED = {
    "bar_sync": r"bar\.sync",
    "shared_loads": r"ld\.shared",
    "shared_stores": r"st\.shared",
    "tma_in": r"cp\.async\.bulk\.(tensor\.\dd\.)?shared",
    "tma_out": r"cp\.async\.bulk\.(tensor\.\dd\.)?global",
    "float_ops": r"(fma\.rn|mul|add|sub)(\.rn)?\.f32",
}
_OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)")


def ptxas_usage(report: str) -> dict[str, int]:
    """Registers, spilled bytes (stores + loads), stack bytes and named barriers from a
    ``ptxas -v`` report of one kernel."""

    def number(pattern: str) -> int:
        match = re.search(pattern, report)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "barriers": number(r"used (\d+) barriers"),
    }


def ptx_counts(ptx: str) -> dict[str, int]:
    """How many of each ``_COUNTED`` kind of instruction a kernel's PTX has (comments and
    directives skipped)."""
    counts = dict.fromkeys(_COUNTED, 0)
    for line in ptx.splitlines():
        if line.lstrip().startswith(("//", ".")):
            continue
        match = _OPCODE.match(line)
        if not match:
            continue
        opcode = match.group(1)
        for kind, pattern in _COUNTED.items():
            if re.match(pattern, opcode):
                counts[kind] += 1
    return counts


def kernel_rows(folder: Path, block_rows: int) -> list[dict[str, Any]]:
    """One row per kernel dumped in ``folder`` (``hgrn_<kernel>_<n>.ptx`` and ``.ptxas``), in
    the order they were compiled."""
    rows = []
    dumps = sorted(folder.glob("hgrn_*.ptx"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for ptx_path in dumps:
        report = ptx_path.with_suffix(".ptxas")
        row = {"kernel": ptx_path.stem.removeprefix("hgrn_").rsplit("_", 1)[0]}
        row |= ptxas_usage(report.read_text() if report.exists() else "")
        row |= ptx_counts(ptx_path.read_text())
        for kind in ("bar_sync", "shared_loads", "shared_stores", "float_ops"):
            row[f"{kind}_per_row"] = row[kind] / block_rows
        rows.append(row)
    return rows


def channels(width: int) -> int:
    """The inputs' channels for programs of ``width``: four tiles of 128, or just the width."""
    return 512 if width == 128 else width


def compile_case(variant: str, dtype: str, width: int, length: int) -> None:
    """In the child process: compile the case's forward+backward for a deviceless H200."""
    import jax
    import jax.numpy as jnp

    from benchmarks.gpu_compile import gpu_device, traced_for_gpu
    from hgrn_jax.ops import linear_recurrence
    from hgrn_jax.ops.pallas_recurrence import streaming_options

    device = gpu_device()

    def loss(a, x):
        with streaming_options(backend="mosaic_gpu", **VARIANTS[variant]):
            h = linear_recurrence(a, x, method="pallas")
        return jnp.sum(jnp.real(h).astype(jnp.float32))

    sharding = jax.sharding.SingleDeviceSharding(device)
    shape = (BATCH, length, channels(width))
    array = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
    with traced_for_gpu():
        jax.jit(jax.grad(loss, argnums=(0, 1))).lower(array, array).compile()


def run_case(variant: str, dtype: str, width: int, length: int) -> list[dict[str, Any]]:
    """Compile one case in a child process and read what its Mosaic GPU dumped."""
    from hgrn_jax.ops.pallas_recurrence import StreamingOptions

    with tempfile.TemporaryDirectory() as folder:
        env = os.environ | {
            "JAX_PLATFORMS": "cpu",
            "MOSAIC_GPU_DUMP_PTX": "1",
            "MOSAIC_GPU_DUMP_PTXAS": "1",
            "MOSAIC_GPU_DUMP_TO": folder,
        }
        case = json.dumps([variant, dtype, width, length])
        child = subprocess.run(
            [sys.executable, __file__, "--child", case], env=env, capture_output=True, text=True
        )
        if child.returncode:
            tail = (child.stderr or child.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{variant} {dtype} width {width}: " + " | ".join(tail))
        block_rows = StreamingOptions().block_rows
        rows = kernel_rows(Path(folder), block_rows)
    if not rows:
        raise RuntimeError(f"{variant} {dtype} width {width}: Mosaic GPU dumped no kernel")
    return [{"variant": variant, "dtype": dtype, "width": width, **row} for row in rows]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "complex64"])
    parser.add_argument("--widths", nargs="+", type=int, choices=[32, 64, 128], default=[128, 32])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tag", default="_sm90", help="suffix of the JSON file name")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.child:
        compile_case(*json.loads(args.child))
        return
    rows, failed = [], []
    for variant in args.variants:
        for dtype in args.dtypes:
            for width in args.widths:
                print(f"compiling {variant}, {dtype}, width {width} ...", flush=True)
                try:
                    rows += run_case(variant, dtype, width, args.length)
                except RuntimeError as error:
                    print(f"  failed: {error}", flush=True)
                    failed.append(str(error))
    if not rows:  # no compiler here (the CUDA plugin is missing): keep the committed results
        sys.exit(
            f"mosaic_ptx.py: no case compiled ({len(failed)} failed, listed above); wrote nothing"
        )
    print(format_table(rows, COLUMNS))
    meta = {
        "target": "NVIDIA H200 (sm_90a), deviceless: compiled by ptxas, not run",
        "shapes": {width: [BATCH, args.length, channels(width)] for width in args.widths},
        "failed": failed,
    }
    print("wrote", write_results("mosaic_ptx" + args.tag, rows, meta))
    if failed:
        sys.exit(f"mosaic_ptx.py: {len(failed)} case(s) failed to compile (listed above)")


if __name__ == "__main__":
    main()
