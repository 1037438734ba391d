"""The GPU kernels' instruction schedule, compiled for a GPU on a machine without one.

    python benchmarks/kernel_sass.py [--variants default "loads ahead" ...] [--dtypes float32 ...]
                                     [--length 4096] [--arch 90] [--tag _sm90]

Needs the ``triton`` package, which is not a project dependency (``pip install triton`` in any
environment; it brings ``ptxas`` and ``cuobjdump``), and no GPU. For each variant of
``benchmarks/pallas_gpu.py`` and each dtype it lowers ``linear_recurrence(method="pallas")``
forward+backward at (8, ``--length``, 512) for CUDA (JAX's cross-platform lowering), takes the
Triton IR of every kernel from Pallas's debug output, compiles it with Triton for ``sm_<arch>``
and reads the machine code (SASS). Per kernel it reports the registers and local-memory bytes
(spills) and, for the loop that walks time and stores, its loads and stores per iteration and
its **memory round trips**: the runs of loads in the loop body that come after a store in
program order (``1 +`` the store-to-load transitions). A load after a store to an address the
compiler cannot prove different waits for it, so each run costs one memory latency: one per time
step when each step loads after the previous step's store, one per unrolled group when the
group's loads come first (``StreamingOptions.loads_ahead``).

This measures what the compiler emits, not time: ``pallas_gpu.py`` on a GPU times the same
variants. Results: ``benchmarks/results/kernel_sass[TAG]_cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from benchmarks.common import format_table, write_results
from benchmarks.pallas_gpu import BATCH, CHANNELS, VARIANTS
from hgrn_jax.ops.pallas_recurrence import StreamingOptions, pallas_linear_recurrence
from hgrn_jax.ops.pallas_recurrence import streaming_options as set_streaming_options

COLUMNS = [
    "variant",
    "dtype",
    "kernel",
    "registers",
    "local_bytes",
    "loop_loads",
    "loop_stores",
    "round_trips",
    "steps",
    "round_trips_per_step",
]


@contextlib.contextmanager
def pallas_debug_output():
    """Every ``pl.pallas_call`` made inside runs with ``debug=True``; yields the buffer that
    collects what it prints (the kernel's jaxpr and its Triton module)."""
    original = pl.pallas_call
    pl.pallas_call = functools.partial(original, debug=True)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        pl.pallas_call = original


def printed_modules(printed: str) -> dict[str, str]:
    """``{kernel name: Triton module as printed}`` from Pallas's debug output (each operation
    still tagged with the primitive it came from, e.g. ``"get:"`` for a read, ``"swap:"`` for a
    store and the read of the old value it lowers with)."""
    return {
        match.group(1): match.group(0)
        for match in re.finditer(r"^module @(\w+) \{$.*?^\}", printed, re.M | re.S)
    }


def triton_modules(printed: str) -> dict[str, str]:
    """``{kernel name: parseable Triton IR}`` from Pallas's debug output, its location
    annotations (which the printer writes in a form the parser does not read) removed."""
    modules = {}
    for name, text in printed_modules(printed).items():
        text = re.sub(r"\s*\(#loc\d*\)|\s*\[unknown\]", "", text)
        text = re.sub(r' "[\w.:-]*"(?=[\s)]*$)', "", text, flags=re.M)
        modules[name] = re.sub(r' "[\w.-]*:"', "", text)
    return modules


def lowered_modules(dtype, length: int, overrides: dict[str, Any]) -> dict[str, str]:
    """The Triton IR of the kernels of one forward+backward of the Pallas recurrence."""
    spec = jax.ShapeDtypeStruct((BATCH, length, CHANNELS), dtype)

    def grads(a, x):
        fn = functools.partial(pallas_linear_recurrence, schedule="streaming", interpret=False)
        return jax.vjp(fn, a, x)[1](x)

    with set_streaming_options(**overrides), pallas_debug_output() as printed:
        jax.jit(grads).trace(spec, spec).lower(lowering_platforms=("cuda",))
    return triton_modules(printed.getvalue())


@dataclasses.dataclass
class Instruction:
    address: int
    opcode: str
    target: int | None  # a branch's target address


def sass_instructions(sass: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` output: address, opcode (predicate dropped)."""
    out = []
    for line in sass.splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);", line)
        if found:
            target = re.search(r"0x([0-9a-f]+)", found.group(4))
            out.append(
                Instruction(
                    int(found.group(1), 16),
                    found.group(3),
                    int(target.group(1), 16) if found.group(3) == "BRA" and target else None,
                )
            )
    return out


def storing_loop(instructions: list[Instruction]) -> list[Instruction] | None:
    """The body of the loop (a backward branch's range) with the most global stores."""
    bodies = [
        [i for i in instructions if branch.target <= i.address <= branch.address]
        for branch in instructions
        if branch.target is not None and branch.target < branch.address
    ]
    bodies = [b for b in bodies if any(i.opcode.startswith("STG") for i in b)]
    return max(bodies, key=lambda b: sum(i.opcode.startswith("STG") for i in b), default=None)


def round_trips(body: list[Instruction]) -> int:
    """Runs of global loads, each starting the body or following a global store."""
    trips, after_store, seen_load = 0, True, False
    for i in body:
        if i.opcode.startswith("STG"):
            after_store = True
        elif i.opcode.startswith("LDG"):
            if after_store:
                trips += 1
            after_store, seen_load = False, True
    return trips if seen_load else 0


def compile_kernel(ir: str, *, arch: int, num_warps: int, num_stages: int, folder: Path):
    """``(SASS text, resource usage text)`` of one kernel compiled by Triton for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    source = folder / "kernel.ttir"
    source.write_text(ir)
    compiled = triton.compile(
        str(source),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    cubin = folder / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    sass = subprocess.run(
        [str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    usage = subprocess.run(
        [str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    return sass, usage


def kernel_row(name: str, sass: str, usage: str, unroll: int) -> dict[str, Any]:
    registers = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    body = storing_loop(sass_instructions(sass))
    row: dict[str, Any] = {
        "kernel": name.removeprefix("linear_recurrence_"),
        "registers": int(registers.group(1)) if registers else None,
        "local_bytes": int(local.group(1)) if local else None,
    }
    if body is None:  # the summary kernels store only after their loop
        return row | dict.fromkeys(COLUMNS[5:], None)
    trips = round_trips(body)
    return row | {
        "loop_loads": sum(i.opcode.startswith("LDG") for i in body),
        "loop_stores": sum(i.opcode.startswith("STG") for i in body),
        "round_trips": trips,
        "steps": unroll,
        "round_trips_per_step": trips / unroll,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "complex64"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    try:
        import triton
    except ImportError:
        raise SystemExit(
            "kernel_sass.py needs the triton package (pip install triton): it compiles the "
            "kernels' Triton IR for a GPU; no GPU is needed"
        ) from None
    meta = {
        "shape": [BATCH, args.length, CHANNELS],
        "arch": f"sm_{args.arch}",
        "triton": triton.__version__,
        "round_trips": "runs of global loads in the time loop's body that start it or follow a "
        "global store (each waits one memory latency)",
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants:
            options = dataclasses.replace(StreamingOptions(), **VARIANTS[variant])
            for dtype_name in args.dtypes:
                modules = lowered_modules(jnp.dtype(dtype_name), args.length, VARIANTS[variant])
                for name, ir in modules.items():
                    sass, usage = compile_kernel(
                        ir,
                        arch=args.arch,
                        num_warps=max(1, (options.block_channels or 32) // 32),
                        num_stages=options.num_stages,
                        folder=Path(folder),
                    )
                    row = {"variant": variant, "dtype": dtype_name}
                    rows.append(row | kernel_row(name, sass, usage, options.unroll))
                    print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    print(format_table(rows, COLUMNS))
    print("wrote", write_results("kernel_sass" + args.tag, rows, meta))


if __name__ == "__main__":
    main()
