"""HGRN2's matrix recurrence per method against HGRN's recurrence and softmax attention.

    python benchmarks/matrix_recurrence.py [--sizes 2x1024x4x32x32 ...] [--methods ...]
                                           [--dtype float32|bfloat16] [--reps 5] [--no-fla]
                                           [--tag _h200]

For each size ``BxLxHxKxV`` it times (median of ``--reps`` after a warm-up, jitted) the forward
pass and the forward+backward pass (a VJP with a fixed cotangent, gradients for every input) of

- ``matrix_recurrence(q, k, v, log_decay, method=m)`` for every method (``"pallas"`` runs in the
  Pallas interpreter on CPU: a correctness path, timed only at the smallest size);
- ``hgrn``: HGRN's ``linear_recurrence(a, x)`` (its ``"auto"`` method) over ``B x L x (H*V)``,
  the same number of output channels;
- ``attention``: ``jax.nn.dot_product_attention(q, k, v, is_causal=True)`` with the same
  ``(B, L, H, K)`` queries and keys (values ``V`` wide), XLA's implementation;
- on a CUDA GPU, when ``fla`` imports: fla's ``chunk_gla`` on the same data in PyTorch
  (``fla_chunk_gla``), guarded: an import or call failure is printed and the row skipped.

``ms`` is the fastest of the timed calls (``median_ms`` the median): on a shared machine other
load only ever adds time, so the minimum is the steadiest estimate. ``x_attention`` and ``x_hgrn``
are each row's ``ms`` divided by the attention or HGRN ``ms`` at the same size and pass, measured
in the same run. Results (rewritten after every size):
``benchmarks/results/matrix_recurrence[TAG]_<platform>.json`` (``--tag``, e.g. ``_h200``, so that
one machine's run leaves another's file as it is; the same for the modes below).

``--sequence-parallel`` times :func:`~hgrn_jax.ops.sequence_parallel.sharded_matrix_recurrence`
instead, the time axis split over ``--shards`` devices (on CPU run it with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; default size 2x4096x4x32x32, methods
``sequential`` and ``chunked``), forward and forward+backward, in two variants measured in the
same run: ``one scan`` (the library: one local scan per shard, then the carried-in state's
correction ``scale * (q_t * exp(G_t)) . S_in``) and ``two scans`` (the shard body before
2026-12-02, kept here as the baseline: a local scan for the final state, then a second full scan
from the carried-in state). ``x_two_scans`` is each row's ``ms`` over the two-scan row's;
``max_error`` is the largest difference of the outputs and the gradients of q, k, v and the log
decays from the float64 unsharded recurrence, over each array's largest magnitude. Results:
``benchmarks/results/matrix_recurrence_sequence_parallel[TAG]_<platform>.json``.

``--sequential-before`` times the ``"sequential"`` method against its loops before 2026-12-02
(kept here as the baseline ``sequential (before)``: states carried ``(N, K, V)`` with ``exp(g)``
inside the step, the backward adding each output term before its dots) and ``"chunked"``, each
call in turn (``time_in_turn``), forward and forward+backward, at ``--sizes`` (default
2x1024x4x32x32, 2x4096x4x32x32, 2x1024x4x64x64, 2x4096x4x64x64, and 2x1024x4x16x64, where the
library keeps states ``(K, V)``). ``x_before`` is each row's
``ms`` over the baseline's; ``max_error`` as for ``--sequence-parallel``. Results:
``benchmarks/results/matrix_recurrence_sequential[TAG]_<platform>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import format_table, time_fn, write_results
from hgrn_jax.ops import (
    MATRIX_METHODS,
    default_matrix_method,
    linear_recurrence,
    matrix_recurrence,
    sequence_parallel,
)

matrix_module = importlib.import_module("hgrn_jax.ops.matrix_recurrence")

CPU_SIZES = ("2x256x4x32x32", "2x1024x4x32x32", "2x4096x4x32x32", "1x1024x2x128x128")
ACCELERATOR_SIZES = ("8x1024x4x64x64", "8x4096x4x64x64", "4x16384x4x64x64", "8x4096x8x128x128")
CPU_PALLAS_MAX_TOKENS = 1024  # the interpreter takes ~1 ms per step


def parse_size(text: str) -> tuple[int, int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 5:
        raise SystemExit(f"--sizes {text!r}: expected BxLxHxKxV, e.g. 2x1024x4x32x32")
    return parts  # type: ignore[return-value]


def make_inputs(size, dtype, seed: int = 0) -> dict[str, jax.Array]:
    batch, length, heads, key_dim, value_dim = size
    keys = jax.random.split(jax.random.key(seed), 6)
    qk_shape, v_shape = (batch, length, heads, key_dim), (batch, length, heads, value_dim)
    forget = jax.nn.sigmoid(jax.random.normal(keys[2], qk_shape) + 2.0)
    return {
        "q": jax.random.normal(keys[0], qk_shape, dtype),
        "k": (1.0 - forget).astype(dtype),
        "v": jax.random.normal(keys[1], v_shape, dtype),
        "log_decay": jnp.log(forget).astype(dtype),
        "do": jax.random.normal(keys[3], v_shape, dtype),
        "a": jax.random.uniform(keys[4], (batch, length, heads * value_dim), dtype, 0.9, 1.0),
        "x": jax.random.normal(keys[5], (batch, length, heads * value_dim), dtype),
    }


def passes(forward: Callable, num_inputs: int) -> dict[str, Callable]:
    def forward_backward(*args):
        out, vjp = jax.vjp(forward, *args[:num_inputs])
        return vjp(args[num_inputs])

    return {"forward": jax.jit(forward), "forward+backward": jax.jit(forward_backward)}


def jax_candidates(methods, scale: float) -> dict[str, tuple[Callable, tuple[str, ...]]]:
    candidates: dict[str, tuple[Callable, tuple[str, ...]]] = {}
    for method in methods:
        candidates[method] = (
            lambda q, k, v, g, method=method: matrix_recurrence(
                q, k, v, g, scale=scale, method=method
            ),
            ("q", "k", "v", "log_decay"),
        )
    candidates["hgrn"] = (lambda a, x: linear_recurrence(a, x), ("a", "x"))
    candidates["attention"] = (
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        ("q", "k", "v"),
    )
    return candidates


def fla_passes(data: dict[str, jax.Array], scale: float) -> dict[str, Callable[[], Any]] | None:
    """fla's chunk_gla on the same data (CUDA, PyTorch), or None when it cannot run here."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        from fla.ops.gla import chunk_gla
    except Exception as error:  # fla's import pulls in triton, einops, transformers
        print(f"fla chunk_gla unavailable ({type(error).__name__}: {error}): no fla rows")
        return None

    def to_torch(name):
        return (
            torch.from_numpy(np.asarray(data[name], np.float32))
            .cuda()
            .to(getattr(torch, str(data[name].dtype)))
        )

    q, k, v, g, do = (to_torch(n) for n in ("q", "k", "v", "log_decay", "do"))
    # Our (B, T, H, K) layout; some fla versions default to head-first (B, H, T, K).
    layout = (
        {"head_first": False} if "head_first" in inspect.signature(chunk_gla).parameters else {}
    )

    def forward():
        with torch.no_grad():
            return chunk_gla(q, k, v, g, scale=scale, **layout)[0]

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (q, k, v, g)]
        o = chunk_gla(*leaves, scale=scale, **layout)[0]
        return torch.autograd.grad(o, leaves, do)

    def timed(fn):
        def run():
            fn()
            torch.cuda.synchronize()

        return run

    return {
        "forward": timed(forward),
        "forward+backward": timed(forward_backward),
        "raw_forward": forward,
    }


def agreement(methods, size, dtype, fla_runs: bool) -> dict[str, float]:
    """Max |difference| of each method's output and gradients from ``"sequential"``'s (and from
    fla's chunk_gla when it runs), at ``size``: the compiled kernels' correctness where the
    tests (CPU, Pallas interpreter) cannot reach."""
    data = make_inputs(size, dtype, seed=1)
    scale = size[3] ** -0.5

    def outputs(method):
        def forward(q, k, v, g):
            return matrix_recurrence(q, k, v, g, scale=scale, method=method)

        o, vjp = jax.vjp(forward, *(data[n] for n in ("q", "k", "v", "log_decay")))
        return [np.asarray(t, np.float64) for t in (o, *vjp(data["do"]))]

    reference = outputs("sequential")
    result = {}
    for method in methods:
        if method != "sequential":
            result[method] = max(
                float(np.abs(a - b).max()) for a, b in zip(outputs(method), reference)
            )
    if fla_runs:
        fla = fla_passes(data, scale)
        if fla is not None:
            o = np.asarray(fla["raw_forward"]().float().cpu().numpy(), np.float64)
            result["fla_chunk_gla_forward"] = float(np.abs(o - reference[0]).max())
    return result


def time_python(fn: Callable[[], Any], reps: int) -> float:
    """Fastest of ``reps`` calls after a warm-up (``fn`` synchronises the device itself)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def two_scan_local_matrix(q, k, v, g, h0, scale, *, axis_name, method, chunk_size, out_dtype):
    """The shard body of ``sharded_matrix_recurrence`` before 2026-12-02 (the baseline of
    ``--sequence-parallel``): a local scan from zero for the shard's final state, the carries,
    then a second full scan from the carried-in state for the outputs."""
    acc = h0.dtype
    kwargs = dict(method=method, chunk_size=chunk_size)
    _, final = matrix_recurrence(q, k, v, g, return_last_state=True, out_dtype=acc, **kwargs)
    decay = jnp.exp(jnp.sum(g.astype(acc), axis=-3))
    decays = jax.lax.all_gather(decay, axis_name, to="varying")
    finals = jax.lax.all_gather(final, axis_name, to="varying")
    decays = jnp.broadcast_to(decays[..., None], finals.shape)
    carry_in, last = sequence_parallel._chain_carries_recomputed(decays, finals, h0, False)
    carry = carry_in[jax.lax.axis_index(axis_name)]
    o = matrix_recurrence(q, k, v, g, carry, scale=scale, out_dtype=out_dtype, **kwargs)
    return o, last


SHARD_BODIES: dict[str, Callable | None] = {
    "one scan": None,  # the library's own
    "two scans": two_scan_local_matrix,
}


@contextlib.contextmanager
def shard_body(body: Callable | None):
    """``sharded_matrix_recurrence`` traced with ``body`` as its per-shard function (the
    library's own when None)."""
    saved = sequence_parallel._local_matrix
    sequence_parallel._local_matrix = body or saved
    try:
        yield
    finally:
        sequence_parallel._local_matrix = saved


def float64_reference(data, scale: float) -> list[np.ndarray]:
    """The unsharded recurrence's outputs and gradients (q, k, v, log decays) in float64."""
    with jax.enable_x64(True):
        inputs = [
            jnp.asarray(np.asarray(data[n]), jnp.float64) for n in ("q", "k", "v", "log_decay")
        ]
        forward = functools.partial(matrix_recurrence, scale=scale, method="sequential")
        o, vjp = jax.vjp(forward, *inputs)
        grads = vjp(jnp.asarray(np.asarray(data["do"]), jnp.float64))
        return [np.asarray(t) for t in (o, *grads)]


def time_in_turn(calls: dict[Any, tuple[Callable, list]], reps: int) -> dict[Any, dict]:
    """``{key: {"min", "median"}}`` seconds of each ``fn(*args)`` in ``calls``, timed one call
    each in turn for ``reps`` rounds after a warm-up round: on a shared machine a change of
    load then falls on every variant alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(reps):
        for key, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[key].append(time.perf_counter() - start)
    return {key: {"min": min(t), "median": float(np.median(t))} for key, t in times.items()}


def relative_error(outputs, reference) -> float:
    """max |difference| over max |value| of ``outputs`` against the float64 ``reference``
    arrays (the output and the gradients), the largest over them."""
    return max(
        float(np.max(np.abs(np.asarray(t, np.float64) - w)) / np.max(np.abs(w)))
        for t, w in zip(outputs, reference, strict=True)
    )


def rows_against(
    timings: dict, errors: dict, size, baseline: str, ratio_key: str, **fields
) -> list[dict[str, Any]]:
    """One row per ``(variant, pass)`` of :func:`time_in_turn`'s ``timings`` for ``size``, with
    its error, ``fields`` and ``ratio_key``: its time over the ``baseline`` variant's, same pass."""
    rows = [
        {
            "size": "x".join(map(str, size)),
            **fields,
            "variant": variant,
            "pass": pass_name,
            "ms": timing["min"] * 1e3,
            "median_ms": timing["median"] * 1e3,
            "max_error": errors[variant],
        }
        for (variant, pass_name), timing in timings.items()
    ]
    base = {r["pass"]: r["ms"] for r in rows if r["variant"] == baseline}
    for row in rows:
        row[ratio_key] = row["ms"] / base[row["pass"]]
    return rows


def sequence_parallel_main(args) -> None:
    shards = args.shards
    if jax.device_count() < shards:
        raise SystemExit(
            f"--sequence-parallel --shards {shards} needs {shards} devices, found "
            f"{jax.device_count()}: on CPU run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={shards}"
        )
    mesh = jax.make_mesh(
        (shards,),
        ("seq",),
        axis_types=(jax.sharding.AxisType.Explicit,),
        devices=jax.devices()[:shards],
    )
    sizes = [parse_size(s) for s in (args.sizes or ("2x4096x4x32x32",))]
    methods = args.methods if args.methods != list(MATRIX_METHODS) else ["sequential", "chunked"]
    dtype = jnp.dtype(args.dtype)
    time_split = NamedSharding(mesh, P(None, "seq"))
    meta = {
        "sizes": "BxLxHxKxV",
        "dtype": args.dtype,
        "scale": "1/sqrt(K)",
        "shards": shards,
        "mesh": "one Explicit axis 'seq'; inputs placed split over time",
        "variants": {
            "one scan": "the library: one local scan per shard and the carried-in correction",
            "two scans": "the shard body before 2026-12-02: a second full scan per shard",
        },
        "max_error": "max |difference| from the float64 unsharded recurrence over max |it|, "
        "outputs and gradients of q, k, v, log decays",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    rows: list[dict[str, Any]] = []
    for size in sizes:
        scale = size[3] ** -0.5
        data = make_inputs(size, dtype)
        reference = float64_reference(data, scale)
        names = ("q", "k", "v", "log_decay", "do")
        inputs = [jax.device_put(data[n], time_split) for n in names]
        for method in methods:
            calls, errors = {}, {}
            for variant, body in SHARD_BODIES.items():
                # A function of its own per variant (jit caches traces by function), traced and
                # compiled with its body here; timed below, the variants in turn.
                def forward(q, k, v, g, method=method):
                    return sequence_parallel.sharded_matrix_recurrence(
                        q, k, v, g, axis_name="seq", scale=scale, method=method
                    )

                with shard_body(body), jax.set_mesh(mesh):
                    fns = passes(forward, 4)
                    o, *grads = (fns["forward"](*inputs[:4]), *fns["forward+backward"](*inputs))
                errors[variant] = relative_error((o, *grads), reference)
                for pass_name, fn in fns.items():
                    args_in = inputs if pass_name == "forward+backward" else inputs[:4]
                    calls[variant, pass_name] = (fn, args_in)
            with jax.set_mesh(mesh):  # the context they were traced in (no new trace)
                timings = time_in_turn(calls, args.reps)
            rows.extend(
                rows_against(timings, errors, size, "two scans", "x_two_scans", method=method)
            )
            meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            write_results("matrix_recurrence_sequence_parallel" + args.tag, rows, meta)
    columns = ["size", "method", "variant", "pass", "ms", "median_ms", "x_two_scans", "max_error"]
    print(format_table(rows, columns))
    print("wrote", write_results("matrix_recurrence_sequence_parallel" + args.tag, rows, meta))


# --- the sequential loops before 2026-12-02 (the baseline of --sequential-before)


def _step_before(state, k_t, v_t, g_t):
    return jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]


def sequential_before(q, k, v, g, h0, scale, chunk):
    """The old forward: states (N, K, V), ``exp(g_t)`` taken inside each step."""
    chunks = matrix_module._time_major_chunks

    def step(state, inputs):
        q_t, k_t, v_t, g_t = inputs
        state = _step_before(state, k_t, v_t, g_t)
        return state, scale * jnp.einsum("nk,nkv->nv", q_t, state)

    def chunk_step(state, inputs):
        last, o = jax.lax.scan(step, state, inputs)
        return last, (o, state)

    last, (o, entering) = jax.lax.scan(
        chunk_step, h0, tuple(chunks(t, chunk) for t in (q, k, v, g))
    )
    bounds = jnp.concatenate([jnp.moveaxis(entering, 0, 1), last[:, None]], axis=1)
    return matrix_module._from_time_major_chunks(o), bounds


def sequential_backward_before(q, k, v, g, bounds, do, dlast, scale, chunk):
    """The old backward: the adjoint (N, K, V) gets step t's output term, then its dots."""
    chunks = matrix_module._time_major_chunks
    q_c, k_c, v_c, g_c, do_c = (chunks(t, chunk) for t in (q, k, v, g, do))

    def forward(state, inputs):
        k_t, v_t, g_t, do_t = inputs
        state = _step_before(state, k_t, v_t, g_t)
        return state, scale * jnp.einsum("nkv,nv->nk", state, do_t)

    def forward_chunk(state, inputs):
        return jax.lax.scan(forward, state, inputs)

    _, dq = jax.lax.scan(forward_chunk, bounds[:, 0], (k_c, v_c, g_c, do_c))

    def backward(adjoint, inputs):
        q_t, k_t, v_t, g_t, do_t = inputs
        adjoint = adjoint + scale * q_t[..., None] * do_t[..., None, :]
        dk_t = jnp.einsum("nkv,nv->nk", adjoint, v_t)
        dv_t = jnp.einsum("nkv,nk->nv", adjoint, k_t)
        return jnp.exp(g_t)[..., None] * adjoint, (dk_t, dv_t)

    def backward_chunk(adjoint, inputs):
        adjoint_in, grads = jax.lax.scan(backward, adjoint, inputs, reverse=True)
        return adjoint_in, (grads, adjoint)

    dh0, ((dk, dv), adjoint_out) = jax.lax.scan(
        backward_chunk, dlast, (q_c, k_c, v_c, g_c, do_c), reverse=True
    )
    from_cumulative = q_c * dq - k_c * dk
    at_end = jnp.sum(adjoint_out * jnp.moveaxis(bounds[:, 1:], 1, 0), axis=-1)
    dg = jnp.flip(jnp.cumsum(jnp.flip(from_cumulative, 1), axis=1), 1) + at_end[:, None]
    grads = (dq, dk, dv, dg)
    return tuple(matrix_module._from_time_major_chunks(t) for t in grads) + (dh0,)


@contextlib.contextmanager
def sequential_loops(before: bool):
    """``matrix_recurrence(method="sequential")`` traced with the loops before 2026-12-02 when
    ``before`` (the library's own otherwise)."""
    saved = matrix_module._sequential, matrix_module._sequential_backward
    if before:
        matrix_module._sequential = sequential_before
        matrix_module._sequential_backward = sequential_backward_before
    try:
        yield
    finally:
        matrix_module._sequential, matrix_module._sequential_backward = saved


SEQUENTIAL_SIZES = (
    "2x1024x4x32x32",
    "2x4096x4x32x32",
    "2x1024x4x64x64",
    "2x4096x4x64x64",
    "2x1024x4x16x64",
)
SEQUENTIAL_VARIANTS: dict[str, tuple[str, bool]] = {
    "sequential (before)": ("sequential", True),
    "sequential": ("sequential", False),
    "chunked": ("chunked", False),
}


def sequential_before_main(args) -> None:
    sizes = [parse_size(s) for s in (args.sizes or SEQUENTIAL_SIZES)]
    dtype = jnp.dtype(args.dtype)
    meta = {
        "sizes": "BxLxHxKxV",
        "dtype": args.dtype,
        "scale": "1/sqrt(K)",
        "variants": {
            "sequential (before)": "the loops before 2026-12-02: states (N, K, V), exp(g) in "
            "each step, the backward's dots after adding the output term",
            "sequential": "the library: states (N, V, K) when K >= V (else (N, K, V)), exp(g) "
            "before the loops, the backward's dots on the loop carry",
            "chunked": "the library's matmul form",
        },
        "timing": "each call in turn, fastest of --reps rounds after a warm-up round",
        "max_error": "max |difference| from the float64 sequential recurrence over max |it|, "
        "outputs and gradients of q, k, v, log decays",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    rows: list[dict[str, Any]] = []
    for size in sizes:
        scale = size[3] ** -0.5
        data = make_inputs(size, dtype)
        reference = float64_reference(data, scale)
        inputs = [data[n] for n in ("q", "k", "v", "log_decay", "do")]
        calls, errors = {}, {}
        for variant, (method, before) in SEQUENTIAL_VARIANTS.items():

            def forward(q, k, v, g, method=method):
                return matrix_recurrence(q, k, v, g, scale=scale, method=method)

            with sequential_loops(before):
                fns = passes(forward, 4)
                o, *grads = (fns["forward"](*inputs[:4]), *fns["forward+backward"](*inputs))
            errors[variant] = relative_error((o, *grads), reference)
            for pass_name, fn in fns.items():
                args_in = inputs if pass_name == "forward+backward" else inputs[:4]
                calls[variant, pass_name] = (fn, args_in)
        timings = time_in_turn(calls, args.reps)
        size_rows = rows_against(timings, errors, size, "sequential (before)", "x_before")
        for row in size_rows:
            print(format_table([row], list(row)).splitlines()[-1], flush=True)
        rows.extend(size_rows)
        meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_results("matrix_recurrence_sequential" + args.tag, rows, meta)
    columns = ["size", "variant", "pass", "ms", "median_ms", "x_before", "max_error"]
    print(format_table(rows, columns))
    print("wrote", write_results("matrix_recurrence_sequential" + args.tag, rows, meta))


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests/test_gpu_session.py, which checks
    benchmarks/gpu_session.sh's flags against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+")
    parser.add_argument(
        "--methods", nargs="+", default=list(MATRIX_METHODS), choices=list(MATRIX_METHODS)
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name, e.g. '_h200'")
    parser.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="time sharded_matrix_recurrence, one scan per shard against two (module docstring)",
    )
    parser.add_argument("--shards", type=int, default=8, help="with --sequence-parallel")
    parser.add_argument(
        "--sequential-before",
        action="store_true",
        help="time the sequential method against its loops before 2026-12-02 (docstring)",
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.sequence_parallel:
        sequence_parallel_main(args)
        return
    if args.sequential_before:
        sequential_before_main(args)
        return
    platform = jax.default_backend()
    sizes = [
        parse_size(s)
        for s in (args.sizes or (CPU_SIZES if platform == "cpu" else ACCELERATOR_SIZES))
    ]
    dtype = jnp.dtype(args.dtype)

    checks = {}
    if platform != "cpu":
        checks = agreement(args.methods, sizes[0], dtype, not args.no_fla)
        print("max |difference| from sequential (outputs and gradients):", checks, flush=True)

    meta = {
        "sizes": "BxLxHxKxV",
        "dtype": args.dtype,
        "scale": "1/sqrt(K)",
        "hgrn": "linear_recurrence (method auto) over B x L x (H*V)",
        "attention": "jax.nn.dot_product_attention(is_causal=True), XLA",
        "auto": {f"L={s[1]}": default_matrix_method(s[1]) for s in sizes},
        "pallas": "Pallas interpreter on CPU" if platform == "cpu" else "compiled kernel",
        "max_abs_difference_from_sequential": checks,
    }
    rows: list[dict[str, Any]] = []
    for size in sizes:
        batch, length, heads, key_dim, value_dim = size
        scale = key_dim**-0.5
        data = make_inputs(size, dtype)
        size_rows = []
        for name, (forward, names) in jax_candidates(args.methods, scale).items():
            if name == "pallas" and platform == "cpu" and batch * length > CPU_PALLAS_MAX_TOKENS:
                continue
            for pass_name, fn in passes(forward, len(names)).items():
                inputs = [data[n] for n in names]
                if pass_name == "forward+backward":
                    inputs.append(jnp.ones_like(data["x"]) if name == "hgrn" else data["do"])
                try:
                    timing = time_fn(fn, *inputs, reps=args.reps)
                except Exception as error:  # e.g. out of memory at the largest size
                    print(f"{name} {pass_name} {size}: {type(error).__name__}: {error}")
                    continue
                size_rows.append(
                    {
                        "size": "x".join(map(str, size)),
                        "method": name,
                        "pass": pass_name,
                        "ms": timing["min"] * 1e3,
                        "median_ms": timing["median"] * 1e3,
                    }
                )
                print(
                    format_table([size_rows[-1]], list(size_rows[-1])).splitlines()[-1], flush=True
                )
        if platform == "gpu" and not args.no_fla:
            fla = fla_passes(data, scale)
            for pass_name, fn in (fla or {}).items():
                if pass_name == "raw_forward":
                    continue
                try:
                    seconds = time_python(fn, args.reps)
                except Exception as error:
                    print(f"fla_chunk_gla {pass_name}: {type(error).__name__}: {error}")
                    continue
                size_rows.append(
                    {
                        "size": "x".join(map(str, size)),
                        "method": "fla_chunk_gla",
                        "pass": pass_name,
                        "ms": seconds * 1e3,
                        "median_ms": seconds * 1e3,
                    }
                )
        for reference in ("attention", "hgrn"):
            base = {r["pass"]: r["ms"] for r in size_rows if r["method"] == reference}
            for row in size_rows:
                row[f"x_{reference}"] = (
                    row["ms"] / base[row["pass"]] if row["pass"] in base else None
                )
        for row in size_rows:
            row["auto"] = default_matrix_method(length) if row["method"] in MATRIX_METHODS else None
        rows.extend(size_rows)
        # A run stopped early keeps its sizes.
        write_results("matrix_recurrence" + args.tag, rows, meta)

    columns = ["size", "method", "pass", "ms", "median_ms", "x_attention", "x_hgrn"]
    print(format_table(rows, columns))
    print("wrote", write_results("matrix_recurrence" + args.tag, rows, meta))


if __name__ == "__main__":
    main()
