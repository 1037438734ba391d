"""Speed and memory of ``linear_recurrence``: every method against the memory floor.

    python benchmarks/scan.py [--lengths 1024 4096 16384] [--kinds float32 complex64]
                              [--methods auto sequential ...] [--reps 5] [--ablations]

For (B, L, D) = (8, L, 512) and each kind (float32, complex64, bfloat16) it times, jitted:

- ``floor``: one elementwise pass over the same bytes as the forward recurrence (reads ``a`` and
  ``x``, writes one array: ``a * x + x``). No scan can be faster than this.
- ``forward`` and ``forward+backward`` (a VJP with a fixed cotangent) of each method (``auto``
  is what ``method="auto"`` picks here), and of two baselines without our custom VJP: JAX
  differentiating straight through ``jax.lax.associative_scan`` and through ``jax.lax.scan``.

The machine may be shared, so every ratio comes from one run: all functions are compiled first,
then each of ``--reps`` rounds times the floor and every function once, interleaved, and the
ratios use the best (minimum) time of each; ``spread`` (max / min over the rounds) shows the
noise. Forward+backward of ``auto`` should be within ``TARGET_RATIO`` of the floor (the physical
floor is ~2.7: the forward reads a, x and writes h; the backward reads a, h, dh and writes da, dx).
``--ablations`` adds earlier versions of the sequential method, timed in the same rounds
(``ABLATIONS``): ``sequential[fresh buffers, unroll 2]`` is the previous version (results in
fresh buffers filled from a slice of the inputs, 2 steps per iteration), ``sequential[zero
buffers, unroll 8]`` the first one. The method now writes its results over its inputs (the
forward's states over ``x``, the backward's ``dx`` over the cotangent), one step per iteration.

Memory regime: by default every output lands in newly allocated memory, as in a training step,
whose buffers XLA:CPU takes from ``malloc`` at every call. glibc serves arrays this size with
fresh ``mmap``-ed pages, so every call page-faults its outputs in (on the 2-core VM of
``benchmarks/results`` a 64 MiB ``a * x + x`` took 5x longer into fresh memory than over a
donated buffer). ``--donate`` donates ``x`` and the cotangent to every function (fresh copies
are made outside the timed region), which lets the in-place loops skip that cost and shows the
pure memory traffic. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (2 MiB pages for malloc) cuts
the page-fault cost too; ``machine.glibc_tunables`` in the JSON records it
(``benchmarks/host_memory.py`` measures it on training steps).

Also reported: the temporary memory XLA allocates for the forward+backward step
(``compile().memory_analysis().temp_size_in_bytes``; inputs and outputs excluded). Results go to
``benchmarks/results/scan_<platform>.json`` (``scan_<kind>_<platform>.json`` when one kind other
than float32; ``_donated`` follows the kind with ``--donate``, then ``--tag``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import format_table, write_results
from hgrn_jax.ops import METHODS, default_method, linear_recurrence
from hgrn_jax.ops import recurrence as recurrence_module

BASELINES = ("associative_autodiff", "scan_autodiff")
TARGET_RATIO = 3.0
KINDS = ("float32", "complex64", "bfloat16")


def _fresh_buffer(like: jax.Array, fill_from: jax.Array, axis: int, step: int, zeros: bool):
    """A fresh loop buffer shaped like ``like``: zeros, or one time step of ``fill_from``."""
    if zeros:
        return jnp.zeros_like(like)
    axis %= fill_from.ndim
    start = step % fill_from.shape[axis]
    first_step = jax.lax.slice_in_dim(fill_from, start, start + 1, axis=axis)
    return jnp.broadcast_to(first_step, like.shape).astype(like.dtype)


def _sequential_fresh_buffers(zeros: bool, unroll: int):
    """The sequential forward and backward loops as they were before they wrote over their inputs:
    each result in a fresh buffer (``zeros``: ``jnp.zeros_like``, which XLA merges into one
    broadcast and copies per loop, as the first version did; else filled from a slice of another
    array, as the previous version did), ``unroll`` steps per iteration, and with ``zeros`` the
    backward reading ``h`` as its own array rather than writing ``da`` over it."""
    at, put, time_index = (
        recurrence_module._at,
        recurrence_module._put,
        recurrence_module._time_index,
    )

    def forward(a, x, h0, reverse, axis=-2):
        length = x.shape[axis]

        def body(i, carry):
            h, states = carry
            t = time_index(i, length, reverse)
            h = at(a, t, axis) * h + at(x, t, axis)
            return h, put(states, h, t, axis)

        states = _fresh_buffer(x, a, axis, -1 if reverse else 0, zeros)
        return jax.lax.fori_loop(0, length, body, (h0, states), unroll=unroll)[1]

    def backward(a, h, h0, g, reverse, axis=-2):
        length = h.shape[axis]

        def body(i, carry):
            flowing, da, dx = carry
            t = time_index(i, length, not reverse)
            d = at(g, t, axis) + flowing
            prev = t + 1 if reverse else t - 1
            at_edge = prev == (length if reverse else -1)
            states = h if zeros else da
            h_prev = jnp.where(at_edge, h0, at(states, jnp.clip(prev, 0, length - 1), axis))
            return at(a, t, axis) * d, put(da, d * h_prev, t, axis), put(dx, d, t, axis)

        da = jnp.zeros_like(h) if zeros else h
        dx = _fresh_buffer(h, h, axis, -1 if reverse else 0, zeros)
        init = (jnp.zeros_like(h0), da, dx)
        dh0, da, dx = jax.lax.fori_loop(0, length, body, init, unroll=unroll)
        return da, dx, dh0

    return forward, backward


# Earlier versions of the sequential method, timed in the same rounds (see the module docstring):
# the arguments of _sequential_fresh_buffers (zero-filled buffers, steps per iteration).
ABLATIONS = {
    "sequential[fresh buffers, unroll 2]": (False, 2),
    "sequential[zero buffers, unroll 8]": (True, 8),
}


@contextlib.contextmanager
def ablated(name: str):
    """While tracing inside this context, the sequential method runs as
    ``_sequential_fresh_buffers(*ABLATIONS[name])`` builds it. No-op for other names."""
    if name not in ABLATIONS:
        yield
        return
    names = ("_sequential", "_sequential_backward")
    saved = {name: getattr(recurrence_module, name) for name in names}
    forward, backward = _sequential_fresh_buffers(*ABLATIONS[name])
    recurrence_module._sequential, recurrence_module._sequential_backward = forward, backward
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(recurrence_module, name, value)


def _combine(left, right):
    a_l, x_l = left
    a_r, x_r = right
    return a_r * a_l, a_r * x_l + x_r


def associative_autodiff(a: jax.Array, x: jax.Array) -> jax.Array:
    """h = scan(a, x) by ``lax.associative_scan``, differentiated by JAX itself. (B, L, D)."""
    return jax.lax.associative_scan(_combine, (a, x), axis=1)[1]


def scan_autodiff(a: jax.Array, x: jax.Array) -> jax.Array:
    """h = scan(a, x) by ``lax.scan`` over time, differentiated by JAX itself. (B, L, D)."""

    def step(h, inputs):
        a_t, x_t = inputs
        h = a_t * h + x_t
        return h, h

    h0 = jnp.zeros_like(x[:, 0])
    _, h = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(x, 0, 1)))
    return jnp.swapaxes(h, 0, 1)


def recurrence_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The forward function called ``name``: a ``linear_recurrence`` method or a baseline."""
    if name == "associative_autodiff":
        return associative_autodiff
    if name == "scan_autodiff":
        return scan_autodiff
    if name in ABLATIONS:
        return lambda a, x: linear_recurrence(a, x, method="sequential")
    return lambda a, x: linear_recurrence(a, x, method=name)  # "auto" included


def forward_backward(fn: Callable) -> Callable:
    """(a, x, cotangent) -> (da, dx): one forward and one backward pass."""

    def step(a, x, cotangent):
        _, vjp = jax.vjp(fn, a, x)
        return vjp(cotangent)

    return step


def make_inputs(
    batch: int, length: int, channels: int, dtype: jnp.dtype, complex_valued: bool, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decays with modulus in [0.9, 1), standard normal inputs and cotangent, (B, L, D)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    shape = (batch, length, channels)
    a = jax.random.uniform(keys[0], shape, jnp.float32, 0.9, 1.0)
    x = jax.random.normal(keys[1], shape, jnp.float32)
    g = jax.random.normal(keys[2], shape, jnp.float32)
    if complex_valued:
        a = a * jnp.exp(1j * jax.random.uniform(keys[3], shape, jnp.float32, -np.pi, np.pi))
        x = jax.lax.complex(x, jax.random.normal(keys[4], shape, jnp.float32))
        g = jax.lax.complex(g, jax.random.normal(keys[5], shape, jnp.float32))
        return a, x, g
    return a.astype(dtype), x.astype(dtype), g.astype(dtype)


def compiled(fn: Callable, *args: Any, donate: tuple[int, ...] = ()):
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def temp_bytes(executable) -> int | None:
    analysis = executable.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def floor_pass(a: jax.Array, x: jax.Array) -> jax.Array:
    """One elementwise pass over the forward's bytes: reads a and x, writes one array."""
    return a * x + x


def measure_length(
    length: int, kind: str, args: argparse.Namespace, names: list[str]
) -> list[dict]:
    """Rows for one length and kind: every function compiled, then timed interleaved."""
    dtype = jnp.dtype("float32" if kind == "complex64" else kind)
    a, x, g = make_inputs(args.batch, length, args.channels, dtype, kind == "complex64")
    # --donate: x and the cotangent may be overwritten; every call gets fresh copies of them,
    # made outside the timed region.
    fwd_donate, fwd_bwd_donate = ((1,), (1, 2)) if args.donate else ((), ())
    calls = {("floor", "forward"): (compiled(floor_pass, a, x, donate=fwd_donate), (a, x))}
    temps = {}
    for name in names:
        fn = recurrence_fn(name)
        with ablated(name):
            calls[(name, "forward")] = (compiled(fn, a, x, donate=fwd_donate), (a, x))
            fwd_bwd = compiled(forward_backward(fn), a, x, g, donate=fwd_bwd_donate)
        calls[(name, "fwd_bwd")] = (fwd_bwd, (a, x, g))
        temps[name] = _mib(temp_bytes(fwd_bwd))

    def fresh(call_args):
        if not args.donate:
            return call_args
        return jax.block_until_ready((call_args[0], *(v + 0 for v in call_args[1:])))

    for call, call_args in calls.values():  # warm-up
        jax.block_until_ready(call(*fresh(call_args)))
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(args.reps):
        for key, (call, call_args) in calls.items():
            call_args = fresh(call_args)
            start = time.perf_counter()
            jax.block_until_ready(call(*call_args))
            times[key].append(time.perf_counter() - start)
    best = {key: min(t) for key, t in times.items()}
    spread = {key: max(t) / min(t) for key, t in times.items()}
    floor = best[("floor", "forward")]
    rows = [
        dict(
            kind=kind,
            length=length,
            method="floor",
            forward_s=floor,
            forward_ratio=1.0,
            forward_spread=spread[("floor", "forward")],
        )
    ]
    for name in names:
        t_fwd, t_fwd_bwd = best[(name, "forward")], best[(name, "fwd_bwd")]
        row = dict(
            kind=kind,
            length=length,
            method=name,
            forward_s=t_fwd,
            forward_ratio=t_fwd / floor,
            forward_spread=spread[(name, "forward")],
            fwd_bwd_s=t_fwd_bwd,
            fwd_bwd_ratio=t_fwd_bwd / floor,
            fwd_bwd_spread=spread[(name, "fwd_bwd")],
            fwd_bwd_temp_mib=temps[name],
        )
        if name == "auto":
            row["method"] = f"auto ({default_method(length)})"
            row["within_target"] = t_fwd_bwd / floor <= TARGET_RATIO
        rows.append(row)
        print(
            f"  {kind} L={length} {name}: fwd {t_fwd * 1e3:.1f} ms, fwd+bwd "
            f"{t_fwd_bwd * 1e3:.1f} ms ({t_fwd_bwd / floor:.2f}x floor {floor * 1e3:.1f} ms)",
            flush=True,
        )
    return rows


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=["float32", "complex64"],
        help="element types, each measured in the same run",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="one real kind (shorthand for --kinds DTYPE)",
    )
    parser.add_argument(
        "--complex", action="store_true", help="complex64 only (shorthand for --kinds complex64)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument(
        "--reps",
        type=int,
        default=5,
        help="timed rounds after one warm-up (best of them is reported)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="linear_recurrence methods, 'auto' included (default: auto and all "
        "but 'pallas' on CPU, where Pallas only runs in its slow "
        "interpreter)",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the two JAX-autodiff baselines"
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="add the sequential method with its CPU optimisations undone (ABLATIONS)",
    )
    parser.add_argument(
        "--donate",
        action="store_true",
        help="donate x and the cotangent to every function (outputs may reuse their memory "
        "instead of fresh pages; see the module docstring)",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file name, e.g. '_hugepages'")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    if args.complex and args.dtype == "bfloat16":
        parser.error(
            "--complex runs in complex64; drop --dtype bfloat16 (there is no complex bfloat16)"
        )
    kinds = ["complex64"] if args.complex else [args.dtype] if args.dtype else args.kinds
    platform = jax.default_backend()
    methods = args.methods or ["auto"] + [
        m for m in METHODS if not (m == "pallas" and platform == "cpu")
    ]
    unknown = sorted(set(methods) - set(METHODS) - {"auto"})
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {['auto', *METHODS]}")
    names = (
        methods
        + ([] if args.no_baselines else list(BASELINES))
        + (list(ABLATIONS) if args.ablations else [])
    )
    print(
        f"linear_recurrence on {platform} ({jax.devices()[0].device_kind}), "
        f"B={args.batch} D={args.channels} {' '.join(kinds)}; best of {args.reps} interleaved "
        "rounds",
        flush=True,
    )

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows: list[dict] = []
    for kind in kinds:
        for length in args.lengths:
            rows += measure_length(length, kind, args, names)

    columns = [
        "kind",
        "length",
        "method",
        "forward_s",
        "forward_ratio",
        "fwd_bwd_s",
        "fwd_bwd_ratio",
        "fwd_bwd_spread",
        "fwd_bwd_temp_mib",
    ]
    print()
    print(format_table(rows, columns))
    print(
        f"\nratios are to 'floor' (a * x + x over the same arrays), best of {args.reps} "
        "interleaved rounds; spread = slowest / fastest round; temp = XLA temporary buffers of "
        f"one forward+backward step. Target: auto's fwd+bwd <= {TARGET_RATIO}x the floor."
    )
    print(
        "auto picks: "
        + ", ".join(f"L={length}: {default_method(length, platform)}" for length in args.lengths)
    )
    if not args.no_write:
        meta = dict(
            batch=args.batch,
            channels=args.channels,
            kinds=kinds,
            reps=args.reps,
            lengths=args.lengths,
            methods=methods,
            baselines=[] if args.no_baselines else list(BASELINES),
            ablations={
                name: dict(zero_buffers=zeros, unroll=unroll)
                for name, (zeros, unroll) in ABLATIONS.items()
            }
            if args.ablations
            else {},
            floor="a * x + x (reads a and x, writes one array)",
            inputs="x and the cotangent donated" if args.donate else "not donated",
            timing="best of reps interleaved rounds (floor and every function once per "
            "round); spread = max / min",
            target_ratio=TARGET_RATIO,
            auto_picks={str(n): default_method(n, platform) for n in args.lengths},
            load_average_before=load_before,
            load_average_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
        )
        suffix = "" if len(kinds) > 1 or kinds == ["float32"] else f"_{kinds[0]}"
        suffix += "_donated" if args.donate else ""  # not over the fresh-memory numbers
        path = write_results(f"scan{suffix}{args.tag}", rows, meta)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
