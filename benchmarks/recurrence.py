"""The linear recurrence, every method including the Pallas kernel, against the memory floor.

    python benchmarks/recurrence.py [--lengths 1024 4096] [--dtypes float32 bfloat16]
                                    [--methods sequential associative chunked pallas]
                                    [--reps 5] [--no-torch]

For (B, L, D) = (8, L, 512) it times (median of ``--reps`` after a warm-up, jitted):

- ``forward``: ``linear_recurrence(a, x, method=m)``;
- ``forward+backward``: the forward and a VJP with a fixed cotangent (``da``, ``dx``);

against the memory floor: the bytes the pass must move at least (forward: read ``a`` and ``x``,
write ``h``; forward+backward: that, then read ``a``, ``h`` and the cotangent and write ``da``
and ``dx``: 8 arrays), divided by the bandwidth of a large copy measured in the same run. On CPU,
when PyTorch is installed, the same recurrence in PyTorch runs in the same process: an eager loop
over time and ``torch.compile`` of a block of steps (the loop over blocks stays in Python), both
differentiated by autograd. The Pallas kernel runs in the Pallas interpreter on CPU (a
correctness path, not a fast one). Default lengths: 1k-64k on GPU/TPU, 1k and 4k on CPU.
Results: ``benchmarks/results/recurrence_<platform>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import format_table, time_fn, write_results
from hgrn_jax.ops import METHODS, linear_recurrence

BATCH, CHANNELS = 8, 512
ACCELERATOR_LENGTHS = (1024, 4096, 16384, 65536)
CPU_LENGTHS = (1024, 4096)
FORWARD_ARRAYS, BACKWARD_ARRAYS = 3, 5
COPY_BYTES = 512 * 2**20


def copy_bandwidth(reps: int, calls_per_rep: int = 1) -> float:
    """Bytes per second of a large device copy (read once, write once)."""
    x = jnp.ones((COPY_BYTES // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    seconds = time_fn(copy, x, reps=reps, calls_per_rep=calls_per_rep)["min"]
    return 2 * COPY_BYTES / seconds


def jax_passes(method: str) -> dict[str, Callable]:
    def forward(a, x):
        return linear_recurrence(a, x, method=method)

    def forward_backward(a, x, g):
        _, vjp = jax.vjp(forward, a, x)
        return vjp(g)

    return {"forward": jax.jit(forward), "forward+backward": jax.jit(forward_backward)}


def torch_passes(block: int):
    """Eager-loop and compiled-block PyTorch recurrences, or None when torch is missing."""
    try:
        import torch
    except ImportError:
        return None

    # unbind/split rather than indexing: the backward of a[:, t] writes a full-size zero
    # gradient per step (quadratic in L); unbind's backward is one stack.
    def loop(a, x):
        h = torch.zeros_like(x[:, 0])
        out = []
        for a_t, x_t in zip(a.unbind(1), x.unbind(1)):
            h = a_t * h + x_t
            out.append(h)
        return torch.stack(out, 1)

    def block_scan(a, x, h):
        out = []
        for a_t, x_t in zip(a.unbind(1), x.unbind(1)):
            h = a_t * h + x_t
            out.append(h)
        return torch.stack(out, 1), h

    # One thread: (8, 512) steps are too small to split, and spinning threads fight XLA's pool.
    torch.set_num_threads(1)
    compiled_block = torch.compile(block_scan, dynamic=False)

    def compiled(a, x):
        h = torch.zeros_like(x[:, 0])
        outs = []
        for a_block, x_block in zip(a.split(block, 1), x.split(block, 1)):
            out, h = compiled_block(a_block, x_block, h)
            outs.append(out)
        return torch.cat(outs, 1)

    return torch, {"torch_loop": loop, f"torch_compile_block{block}": compiled}


def time_torch(torch, fn, a, x, g, reps: int) -> dict[str, float]:
    def forward():
        with torch.no_grad():
            fn(a, x)

    def forward_backward():
        a_ = a.detach().requires_grad_()
        x_ = x.detach().requires_grad_()
        torch.autograd.grad(fn(a_, x_), (a_, x_), g)

    result = {}
    for name, run in (("forward", forward), ("forward+backward", forward_backward)):
        run()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        result[name] = float(np.median(times))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--torch-block", type=int, default=16)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    platform = jax.default_backend()
    lengths = args.lengths or (CPU_LENGTHS if platform == "cpu" else ACCELERATOR_LENGTHS)

    bandwidth = copy_bandwidth(args.reps)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s ({platform})", flush=True)
    torch_impls = None
    if platform == "cpu" and not args.no_torch:
        torch_impls = torch_passes(args.torch_block)
        if torch_impls is None:
            print("PyTorch not installed: skipping the torch rows (pip install torch)")

    rows: list[dict[str, Any]] = []

    def add(method, dtype_name, length, pass_name, seconds, itemsize):
        arrays = FORWARD_ARRAYS + (BACKWARD_ARRAYS if pass_name == "forward+backward" else 0)
        floor = arrays * BATCH * length * CHANNELS * itemsize / bandwidth
        row = {
            "method": method,
            "dtype": dtype_name,
            "length": length,
            "pass": pass_name,
            "ms": seconds * 1e3,
            "floor_ms": floor * 1e3,
            "x_floor": seconds / floor,
        }
        rows.append(row)
        print(format_table([row], list(row)).splitlines()[-1], flush=True)

    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        for length in lengths:
            keys = jax.random.split(jax.random.key(length), 3)
            shape = (BATCH, length, CHANNELS)
            a = jax.random.uniform(keys[0], shape, dtype, 0.9, 1.0)
            x = jax.random.normal(keys[1], shape, dtype)
            g = jax.random.normal(keys[2], shape, dtype)
            for method in args.methods:
                for pass_name, fn in jax_passes(method).items():
                    inputs = (a, x) if pass_name == "forward" else (a, x, g)
                    seconds = time_fn(fn, *inputs, reps=args.reps)["median"]
                    add(method, dtype_name, length, pass_name, seconds, dtype.itemsize)
            if torch_impls is not None:
                torch, impls = torch_impls
                as_torch = lambda v: torch.from_numpy(np.asarray(v, np.float32)).to(
                    getattr(torch, dtype_name)
                )
                ta, tx, tg = as_torch(a), as_torch(x), as_torch(g)
                for name, fn in impls.items():
                    for pass_name, seconds in time_torch(
                        torch, fn, ta, tx, tg, max(1, args.reps // 2)
                    ).items():
                        add(name, dtype_name, length, pass_name, seconds, dtype.itemsize)

    print(format_table(rows, ["method", "dtype", "length", "pass", "ms", "floor_ms", "x_floor"]))
    meta = {
        "batch": BATCH,
        "channels": CHANNELS,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor": "(3 forward + 5 backward arrays) * B*L*D*itemsize / copy bandwidth",
        "pallas": "Pallas interpreter on CPU" if platform == "cpu" else "compiled kernel",
    }
    print("wrote", write_results("recurrence", rows, meta))


if __name__ == "__main__":
    main()
