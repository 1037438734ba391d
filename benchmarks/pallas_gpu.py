"""The Pallas kernel on a GPU: correctness against the pure-JAX methods, then a sweep of its
launch parameters (:class:`hgrn_jax.ops.pallas_recurrence.StreamingOptions`).

    python benchmarks/pallas_gpu.py [--lengths 4096 16384] [--reps 5]

Correctness: forward states, final state and the gradients of a random linear loss with respect
to ``a``, ``x`` and ``h0`` against ``method="associative"`` (float32 and complex64) for forward
and reverse scans, at a shape whose channels (300) and time chunks do not divide the tiles; the
maximum relative error is printed and stored, and the script exits with an error above 1e-4
(1e-2 for bfloat16 inputs, whose states are rounded to bf16).
Sweep: (B, D) = (8, 512) float32, forward and forward+backward, the default options and one
change at a time (chunk length, channels per program, unroll, pipelining stages), with the
memory floor of ``benchmarks/recurrence.py`` (3 / 8 arrays over the bandwidth of a large copy).
Results: ``benchmarks/results/pallas_sweep_<platform>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import format_table, time_fn, write_results
from benchmarks.recurrence import copy_bandwidth
from hgrn_jax.ops import linear_recurrence
from hgrn_jax.ops.pallas_recurrence import StreamingOptions, streaming_options

BATCH, CHANNELS = 8, 512
CHECK_SHAPE = (3, 1000, 300)
TOLERANCE = {"float32": 1e-4, "complex64": 1e-4, "bfloat16": 1e-2}


def sweep_options() -> list[tuple[str, dict[str, Any]]]:
    """The default, then one field changed at a time."""
    variants = [("default", {})]
    variants += [
        (f"chunk_length={c}", {"chunk_length": c}) for c in (1 << 30, 2048, 1024, 512, 128)
    ]
    variants += [(f"block_channels={b}", {"block_channels": b}) for b in (64, 128)]
    variants += [(f"unroll={u}", {"unroll": u}) for u in (4, 16)]
    variants += [("num_stages=2", {"num_stages": 2})]
    return variants


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.complex128), np.asarray(want, np.complex128)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check(dtype_name: str, reverse: bool, chunk_length: int | None) -> dict[str, Any]:
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

    with streaming_options(chunk_length=chunk_length):
        got = run("pallas")
    want = run("associative")
    errors = {
        name: relative_error(g, w_) for name, g, w_ in zip(("h", "da", "dx", "dh0"), got, want)
    }
    row = {
        "dtype": dtype_name,
        "reverse": reverse,
        "chunk_length": chunk_length or "default",
        **errors,
        "ok": max(errors.values()) <= TOLERANCE[dtype_name],
    }
    print(format_table([row], list(row)).splitlines()[-1], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print("devices:", jax.devices(), flush=True)
    checks = [
        check(d, r, c)
        for d in ("float32", "complex64", "bfloat16")
        for r in (False, True)
        for c in (None, 96)
    ]
    bandwidth = copy_bandwidth(args.reps)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows: list[dict[str, Any]] = []
    for length in args.lengths:
        keys = jax.random.split(jax.random.key(length), 3)
        shape = (BATCH, length, CHANNELS)
        a = jax.random.uniform(keys[0], shape, jnp.float32, 0.9, 1.0)
        x, g = (jax.random.normal(k, shape) for k in keys[1:])
        for name, overrides in sweep_options():
            with streaming_options(**overrides) as options:
                chunk, chunks = options.chunking(BATCH * CHANNELS, length)
                fwd = jax.jit(lambda a, x: linear_recurrence(a, x, method="pallas"))
                fwd_bwd = jax.jit(
                    lambda a, x, g: jax.vjp(
                        lambda a, x: linear_recurrence(a, x, method="pallas"), a, x
                    )[1](g)
                )
                for pass_name, fn, inputs, arrays in (
                    ("forward", fwd, (a, x), 3),
                    ("forward+backward", fwd_bwd, (a, x, g), 8),
                ):
                    seconds = time_fn(fn, *inputs, reps=args.reps)["median"]
                    floor = arrays * a.size * 4 / bandwidth
                    row = {
                        "variant": name,
                        "length": length,
                        "chunk_length": chunk,
                        "chunks": chunks,
                        "pass": pass_name,
                        "ms": seconds * 1e3,
                        "x_floor": seconds / floor,
                    }
                    rows.append(row)
                    print(format_table([row], list(row)).splitlines()[-1], flush=True)
    print(format_table(rows, list(rows[0])))
    meta = {
        "batch": BATCH,
        "channels": CHANNELS,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "defaults": dataclasses.asdict(StreamingOptions()),
        "checks": checks,
    }
    print("wrote", write_results("pallas_sweep", rows, meta))
    if not all(c["ok"] for c in checks):
        raise SystemExit("pallas_gpu: a correctness check failed (see the 'ok' column)")


if __name__ == "__main__":
    main()
