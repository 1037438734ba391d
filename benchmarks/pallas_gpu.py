"""The Pallas kernel on a GPU: correctness against the pure-JAX methods, its time against the
memory floor, then a sweep of its launch parameters
(:class:`hgrn_jax.ops.pallas_recurrence.StreamingOptions`).

    python benchmarks/pallas_gpu.py [--lengths 4096 16384 65536] [--dtypes float32 bfloat16]
                                    [--variants default "loads after stores" "chain in kernel"
                                                mosaic_gpu "mosaic_gpu, auto barriers"]
                                    [--trace-lengths 4096] [--sweep-lengths [4096 65536]]
                                    [--sweep-dtypes float32 bfloat16] [--sweep-base default]
                                    [--reps 5] [--deadline SECONDS] [--tag _h200]

Correctness: forward states, final state and the gradients of a random linear loss with respect
to ``a``, ``x`` and ``h0`` against ``method="associative"`` (float32 and complex64) for forward
and reverse scans, at a shape whose channels (300) and time chunks do not divide the tiles; the
maximum relative error is printed and stored, and the script exits with an error above 1e-4
(1e-2 for bfloat16 inputs, whose states are rounded to bf16).
Time: (B, D) = (8, 512), the default options, forward and forward+backward at ``--lengths`` in
each of ``--dtypes``, against the memory floor: the arrays the pass must move (forward 3,
forward+backward 8) at the inputs' itemsize over the bandwidth of a large copy measured in the
same run. Each repetition makes ``CALLS_PER_REP`` calls back to back (the host's dispatch and
the wait for a result are paid once per repetition, as in a training step).
Variants (``--variants``, timed one after another at each length and dtype, so their ratios come
from one run): the defaults; ``loads after stores``, the kernel timed on an H200 before
``StreamingOptions.loads_ahead`` was on; ``chain in kernel`` (``StreamingOptions.
chain_in_kernel``, off until timed); ``mosaic_gpu``, the same kernels on Mosaic GPU
(``StreamingOptions.backend``; not in the default list), and ``mosaic_gpu, auto barriers``
(``StreamingOptions.auto_barriers``: a ``bar.sync`` before and after every shared-memory
store). The correctness checks run on every variant.
Trace: each variant's forward+backward at ``--trace-lengths`` run under the profiler: kernels
per call, the time some kernel was running against the call's time (``busy``), and the time of
each kernel, so what is not the Pallas kernels (the carries' chain, copies) shows by name.
Sweep: forward+backward at ``--sweep-lengths`` in each of ``--sweep-dtypes``, one option changed
at a time from ``--sweep-base`` (chunk length, shortest chunk, chains aimed for, channels per
program, unroll; from ``mosaic_gpu``: rows per block, blocks in flight, shortest chunk, chains
aimed for); ``--deadline`` stops starting new variants after that many seconds.
Failures: a check, timing or trace that raises (a variant that does not compile here, say) is
recorded with its ``error`` (a failed check: ``ok`` false; a row or trace with ``error``) and the
rest go on; a variant and dtype whose check raised is not timed. The script exits with an error
at the end, naming what failed.
Results (rewritten after every row): ``benchmarks/results/pallas_sweep[TAG]_<platform>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import format_table, time_fn, write_results
from benchmarks.device_time import device_activity, traced_events
from benchmarks.recurrence import copy_bandwidth
from hgrn_jax.ops import linear_recurrence
from hgrn_jax.ops.pallas_recurrence import StreamingOptions, streaming_options

BATCH, CHANNELS = 8, 512
CHECK_SHAPE = (3, 1000, 300)
TOLERANCE = {"float32": 1e-4, "complex64": 1e-4, "bfloat16": 1e-2}
PASS_ARRAYS = {"forward": 3, "forward+backward": 8}
CALLS_PER_REP = 10


# The kernel as it is, as it was when timed on an H200 (2026-11-30: each step's loads after the
# previous step's stores), with the option not yet on by default, and on Mosaic GPU, with and
# without Mosaic GPU's barriers around every shared-memory store (--variants; gpu_session.sh
# times the Mosaic GPU ones in a step of its own, beside "default").
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "loads after stores": {"loads_ahead": False},
    "chain in kernel": {"chain_in_kernel": True},
    "mosaic_gpu": {"backend": "mosaic_gpu"},
    "mosaic_gpu, auto barriers": {"backend": "mosaic_gpu", "auto_barriers": True},
}
DEFAULT_VARIANTS = ["default", "loads after stores", "chain in kernel"]


def sweep_options(base: str = "default") -> list[dict[str, Any]]:
    """One field changed at a time (the base itself is a main row). On an H200 (2026-11-30,
    ``pallas_sweep_h200_gpu.json``) none of these beat the Triton defaults beyond noise at 4k,
    and pipelining stages and a single chunk per sequence were far off; they are not repeated.
    From the Mosaic GPU kernels (untimed): rows per shared-memory block, blocks in flight, and
    fewer or more chunks (each program carries 128 chains, the Triton one 32; at B = 8, D = 512
    the defaults make 32 chunks at 4k and 128 from 16k, 2^16 chains 16 at every length)."""
    if VARIANTS[base].get("backend") == "mosaic_gpu":
        return [
            {"block_rows": 32},
            {"stages": 3},
            {"min_chunk_length": 256},
            {"min_parallel_chains": 1 << 16},
            {"min_parallel_chains": 1 << 20},
        ]
    variants = [{"chunk_length": c} for c in (1024, 256)]
    variants += [{"min_chunk_length": c} for c in (64, 256)]
    variants += [{"min_parallel_chains": 1 << e} for e in (18, 20)]
    variants += [{"block_channels": 64}, {"unroll": 16}]
    return variants


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.complex128), np.asarray(want, np.complex128)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check(
    dtype_name: str, reverse: bool, chunk_length: int | None, variant: str = "default"
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.uniform(0.8, 1.0, CHECK_SHAPE)
    x, h0, w = (rng.standard_normal(s) for s in (CHECK_SHAPE, CHECK_SHAPE[::2], CHECK_SHAPE))
    if dtype_name == "complex64":
        a = a * np.exp(1j * rng.uniform(-0.5, 0.5, CHECK_SHAPE))
        x = x + 1j * rng.standard_normal(CHECK_SHAPE)
    dtype = jnp.dtype(dtype_name)
    a, x = jnp.asarray(a, dtype), jnp.asarray(x, dtype)
    h0, w = jnp.asarray(h0, jnp.float32), jnp.asarray(w, jnp.float32)

    def loss(method, a, x, h0):
        h = linear_recurrence(
            a,
            x,
            h0,
            reverse=reverse,
            method=method,
            out_dtype=jnp.complex64 if dtype_name == "complex64" else jnp.float32,
        )
        return jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) * w[:, ::-1]), h

    def run(method):
        grad = jax.jit(jax.grad(lambda *args: loss(method, *args), argnums=(0, 1, 2), has_aux=True))
        grads, h = grad(a, x, h0)
        return [h, *grads]

    with streaming_options(chunk_length=chunk_length, **VARIANTS[variant]):
        got = run("pallas")
    want = run("associative")
    errors = {
        name: relative_error(g, w_) for name, g, w_ in zip(("h", "da", "dx", "dh0"), got, want)
    }
    row = {
        "variant": variant,
        "dtype": dtype_name,
        "reverse": reverse,
        "chunk_length": chunk_length or "default",
        **errors,
        "ok": max(errors.values()) <= TOLERANCE[dtype_name],
    }
    print(format_table([row], list(row)).splitlines()[-1], flush=True)
    return row


def error_message(error: BaseException) -> str:
    """``"<type>: <message>"`` of ``error`` in one line (a Triton or Mosaic GPU compile error can
    be pages long: its first line and at most 300 characters)."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def guarded_check(
    dtype_name: str, reverse: bool, chunk_length: int | None, variant: str
) -> dict[str, Any]:
    """:func:`check`, or a failed check's row (``ok`` false, ``error``) if it raises."""
    try:
        return check(dtype_name, reverse, chunk_length, variant)
    except Exception as error:  # e.g. a variant that does not compile on this GPU
        row = {
            "variant": variant,
            "dtype": dtype_name,
            "reverse": reverse,
            "chunk_length": chunk_length or "default",
            "ok": False,
            "error": error_message(error),
        }
        print(f"check {variant!r} {dtype_name}: FAILED {row['error']}", flush=True)
        return row


def _inputs(length: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decays in [0.9, 1), inputs and a cotangent, (BATCH, length, CHANNELS) in ``dtype``."""
    keys = jax.random.split(jax.random.key(length), 3)
    shape = (BATCH, length, CHANNELS)
    a = jax.random.uniform(keys[0], shape, jnp.float32, 0.9, 1.0).astype(dtype)
    x, g = (jax.random.normal(k, shape, dtype) for k in keys[1:])
    return a, x, g


def _passes() -> dict[str, Any]:
    """The forward and forward+backward of ``method="pallas"``, jitted afresh: they take the
    streaming options in force when first called (a function already traced keeps its own)."""

    def forward(a, x):
        return linear_recurrence(a, x, method="pallas")

    return {
        "forward": jax.jit(forward),
        "forward+backward": jax.jit(lambda a, x, g: jax.vjp(forward, a, x)[1](g)),
    }


def time_pallas(
    length: int,
    dtype_name: str,
    passes: tuple[str, ...],
    reps: int,
    bandwidth: float,
    variant: str = "default",
    **options,
) -> list[dict[str, Any]]:
    """Rows of ``linear_recurrence(method="pallas")`` at (BATCH, length, CHANNELS) with the
    streaming options of ``variant`` and ``options`` changed: milliseconds per call and the
    ratio to the floor (the arrays a pass must move, ``PASS_ARRAYS``, at the inputs' itemsize,
    over ``bandwidth``)."""
    dtype = jnp.dtype(dtype_name)
    a, x, g = _inputs(length, dtype)
    inputs = {"forward": (a, x), "forward+backward": (a, x, g)}
    rows = []
    with streaming_options(**VARIANTS[variant], **options) as chosen:
        chunk, chunks = chosen.chunking(BATCH * CHANNELS, length)
        fns = _passes()
        for pass_name in passes:
            seconds = time_fn(
                fns[pass_name], *inputs[pass_name], reps=reps, calls_per_rep=CALLS_PER_REP
            )["median"]
            floor = PASS_ARRAYS[pass_name] * a.size * dtype.itemsize / bandwidth
            rows.append(
                {
                    "variant": variant,
                    "sweep": ", ".join(f"{k}={v}" for k, v in options.items()) or "-",
                    "dtype": dtype_name,
                    "length": length,
                    "chunk_length": chunk,
                    "chunks": chunks,
                    "pass": pass_name,
                    "ms": seconds * 1e3,
                    "x_floor": seconds / floor,
                }
            )
            print(format_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
    return rows


TRACE_COLUMNS = ["variant", "dtype", "length", "call_ms", "kernels_per_call", "device_ms", "busy"]
ROW_COLUMNS = [
    "variant",
    "sweep",
    "dtype",
    "length",
    "chunk_length",
    "chunks",
    "pass",
    "ms",
    "x_floor",
]


def trace_pallas(length: int, dtype_name: str, variant: str, calls: int) -> dict[str, Any]:
    """Where forward+backward's time goes on the device: ``calls`` calls back to back under the
    profiler; per call, the kernels launched, the time some kernel was running and each
    kernel's time (names of the Pallas kernels are ``linear_recurrence_*``; the rest is XLA's:
    the chain of carries, layout copies)."""
    a, x, g = _inputs(length, jnp.dtype(dtype_name))
    with streaming_options(**VARIANTS[variant]):
        fn = _passes()["forward+backward"]
        seconds = time_fn(fn, a, x, g, reps=1, calls_per_rep=calls)["median"]
    row: dict[str, Any] = {
        "variant": variant,
        "dtype": dtype_name,
        "length": length,
        "call_ms": seconds * 1e3,
    }
    activity = device_activity(traced_events(lambda: fn(a, x, g), calls))
    if activity is None:
        return row | {"kernels_per_call": None, "device_ms": None, "busy": None, "kernels": None}
    device_s = activity["busy_s"] / calls
    row |= {
        "kernels_per_call": activity["kernels"] / calls,
        "device_ms": device_s * 1e3,
        "busy": device_s / seconds,
        "kernels": {n: s / calls * 1e3 for n, s in activity["by_name"].most_common(12)},
    }
    return row


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests/test_gpu_session.py, which checks
    benchmarks/gpu_session.sh's flags against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(TOLERANCE), default=["float32", "bfloat16"]
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument(
        "--sweep-lengths",
        type=int,
        nargs="*",
        default=[4096, 65536],
        help="lengths of the sweep (none: no sweep)",
    )
    parser.add_argument(
        "--sweep-dtypes", nargs="+", choices=list(TOLERANCE), default=["float32", "bfloat16"]
    )
    parser.add_argument(
        "--sweep-base",
        choices=list(VARIANTS),
        default="default",
        help="the variant whose options the sweep changes one at a time",
    )
    parser.add_argument(
        "--trace-lengths",
        type=int,
        nargs="*",
        default=[4096],
        help="lengths at which each variant's forward+backward is traced (kernels, device time)",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--deadline",
        type=float,
        default=float("inf"),
        help="seconds after which no new sweep variant is started",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument(
        "--allow-interpret",
        action="store_true",
        help="run without a GPU, in Pallas's interpreter (slow; checks only, not timings)",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if jax.default_backend() != "gpu" and not args.allow_interpret:
        parser.exit(
            2,
            f"pallas_gpu.py: JAX sees no GPU (backend {jax.default_backend()!r}); run it on a GPU, "
            "or pass --allow-interpret for Pallas's (slow) interpreter\n",
        )
    started = time.perf_counter()
    print("devices:", jax.devices(), flush=True)
    name = "pallas_sweep" + args.tag
    checks = [
        guarded_check(d, r, c, v)
        for v in dict.fromkeys([*args.variants, args.sweep_base])
        for d in ("float32", "complex64", "bfloat16")
        for r in (False, True)
        for c in (None, 96)
    ]
    # A variant and dtype whose check raised would raise again when timed: not timed.
    broken = {(c["variant"], c["dtype"]): c["error"] for c in checks if "error" in c}
    meta: dict[str, Any] = {
        "batch": BATCH,
        "channels": CHANNELS,
        "defaults": dataclasses.asdict(StreamingOptions()),
        "checks": checks,
    }
    rows: list[dict[str, Any]] = []
    write_results(name, rows, meta)
    bandwidth = copy_bandwidth(args.reps, calls_per_rep=CALLS_PER_REP)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    meta |= {
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor": "arrays moved (forward 3: a, x, h; forward+backward 8: + dh read, da, dx "
        "written, h read) x B*L*D x itemsize / copy bandwidth",
        "timing": f"median of {args.reps} repetitions of {CALLS_PER_REP} calls back to back",
    }

    def timed(length: int, dtype_name: str, passes: tuple[str, ...], variant: str, **options):
        """:func:`time_pallas`'s rows, or one row with the ``error`` if it raises."""
        failed = {
            "variant": variant,
            "sweep": ", ".join(f"{k}={v}" for k, v in options.items()) or "-",
            "dtype": dtype_name,
            "length": length,
        }
        if (variant, dtype_name) in broken:
            print(f"{variant!r} {dtype_name}: not timed, its check raised", flush=True)
            return [
                failed | {"error": f"not timed: its check raised {broken[variant, dtype_name]}"}
            ]
        try:
            return time_pallas(length, dtype_name, passes, args.reps, bandwidth, variant, **options)
        except Exception as error:  # e.g. out of memory at 64k, a launch parameter refused
            failed["error"] = error_message(error)
            print(f"{variant!r} {dtype_name} L={length}: FAILED {failed['error']}", flush=True)
            return [failed]

    for length in args.lengths:
        for dtype_name in args.dtypes:
            for variant in args.variants:
                rows += timed(length, dtype_name, tuple(PASS_ARRAYS), variant)
                write_results(name, rows, meta)
    traces = meta["traces"] = []
    for length in args.trace_lengths:
        for dtype_name in args.dtypes:
            for variant in args.variants:
                if (variant, dtype_name) in broken:
                    continue
                try:
                    traces.append(trace_pallas(length, dtype_name, variant, CALLS_PER_REP))
                except Exception as error:
                    message = error_message(error)
                    print(f"trace {variant!r} {dtype_name} L={length}: FAILED {message}")
                    traces.append(
                        {"variant": variant, "dtype": dtype_name, "length": length}
                        | {"kernels": None, "error": message}
                    )
                print(format_table(traces[-1:], TRACE_COLUMNS).splitlines()[-1], flush=True)
                write_results(name, rows, meta)
    for trace in traces:
        print(f"{trace['variant']}, {trace['dtype']}, L={trace['length']}: ms per call by kernel")
        for kernel, ms in (trace["kernels"] or {}).items():
            print(f"  {ms:8.4f}  {kernel[:100]}")
    for length in args.sweep_lengths:
        for dtype_name in args.sweep_dtypes:
            for overrides in sweep_options(args.sweep_base):
                if time.perf_counter() - started > args.deadline:
                    print(f"deadline ({args.deadline:.0f} s): sweep stopped", flush=True)
                    break
                rows += timed(
                    length, dtype_name, ("forward+backward",), args.sweep_base, **overrides
                )
                write_results(name, rows, meta)
    errors = [r for r in [*rows, *traces] if "error" in r]
    print(format_table(rows, ROW_COLUMNS + (["error"] if errors else [])))
    print("wrote", write_results(name, rows, meta))
    failed_checks = sum(not c["ok"] for c in checks)
    untimed = sum(r["error"].startswith("not timed") for r in errors)
    if failed_checks or errors:
        raise SystemExit(
            f"pallas_gpu: {failed_checks} correctness checks failed (the 'ok' column; 'error' "
            f"where one raised), {len(errors) - untimed} timings or traces raised, {untimed} "
            "rows not timed as their check raised (their 'error'); the rest were measured"
        )


if __name__ == "__main__":
    main()
