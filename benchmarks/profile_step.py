"""Where one training step's time goes: the whole step by source line, and the HGRU mixer taken
apart.

    python benchmarks/profile_step.py [--lengths 1024 4096] [--reps 5] [--models ...]

Models (the CPU sizes of ``benchmarks/train_throughput.py``): ``lra_text``, the LRA
Text/ListOps classifier (1-D bidirectional complex HGRU, BatchNorm, d 32, 2 layers, batch 8;
ListOps runs the same network on other tokens), ``lm``, the WikiText-103 LM (causal complex
HGRU, LayerNorm, bilinear GLU, d 128, 2 layers, batch 1), and ``2d_mixer``, the LRA classifier
with the 2-D mixer (four scans over a sqrt(L) x sqrt(L) grid).

**The step by source** (``benchmarks/step_trace.py``): one training step (loss, gradient,
AdamW), traced; every XLA operation's time is credited to the line of ``hgrn_jax`` that made it
(``hgru.py:_HGRUBase.output`` is ``[Re h | Im h]``, the LayerNorm, the output gate and
projection; ``recurrence.py`` the scans' loops; ``norms.py`` the block norms; ``optax`` the
optimizer), split into the forward and the backward pass. Shares are of the summed operation
time, which exceeds the step's wall time because XLA:CPU runs independent operations on both
threads; the loops read slower than untraced (their bodies are traced at every iteration).

**The mixer by stage**: forward+backward (a VJP with a fixed random cotangent, with respect to
the input and every parameter) of nested prefixes of one mixer layer at the model's (B, L, d)::

    projections   the input, lambda and gate projections (``projections()``)
    gates         + silu / sigmoid / the complex input (``decay_and_input``)
    scans         + the decays (lam * exp(i theta)) and every scan, summed
    layer         + [Re h | Im h], LayerNorm, output gate and output projection (the whole
                  mixer)

and the scans alone (``linear_recurrence`` on the (B, L, d) complex decays and inputs, once per
direction/axis), so each stage's share is the difference to the previous one. The whole train
step is timed with it; ``mixers_share`` = layers x mixer time / step time. Timings are the best
of ``--reps`` interleaved rounds (one run; ``spread`` = slowest / fastest round shows the noise).
Results: ``benchmarks/results/profile_step_<platform>.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import format_table, write_results
from benchmarks.step_trace import attribute
from benchmarks.train_throughput import (
    LRA_TEXT,
    SMALL,
    SMALL_LRA,
    builders,
    random_tokens,
    train_step_fn,
)
from hgrn_jax.nn import HGRU, HGRU2D
from hgrn_jax.ops import linear_recurrence

STAGES = ("projections", "gates", "scans", "layer")


def stage_fn(
    mixer: nnx.Module,
    stage: str,
    directions: tuple[str, ...],
    axes: tuple[int, ...],
    x: jax.Array,
) -> tuple[Callable, tuple]:
    """A jitted forward+backward of the mixer computed up to ``stage`` (see the module
    docstring) and its arguments: the parameters, ``x`` and a random cotangent of the stage's
    outputs."""
    graphdef, state = nnx.split(mixer)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        projected = m.projections(x)
        if stage == "projections":
            return projected
        lam, b = m.decay_and_input(x, 0.5, projected)
        if stage == "gates":
            return lam, b, projected[2]
        h = 0.0
        for direction in directions:
            for axis in axes:
                h = h + m.scan(m.decay(lam, direction), b, direction, axis=axis)
        if stage == "scans":
            return h, projected[2]
        return m.output(h, x, gate=projected[2])

    return forward_backward(run, (state, x), jax.random.key(2))


def forward_backward(run: Callable, primals: tuple, key: jax.Array) -> tuple[Callable, tuple]:
    """A jitted VJP of ``run`` at ``primals`` with a random cotangent (:func:`random_like` of
    its outputs), and the arguments to call it with: ``(*primals, cotangent)``."""

    def vjp_of_run(*args):
        *inputs, cotangent = args
        _, vjp = jax.vjp(run, *inputs)
        return vjp(cotangent)

    cotangent = random_like(jax.eval_shape(run, *primals), key)
    return jax.jit(vjp_of_run), (*primals, cotangent)


def random_like(tree, key: jax.Array):
    """Standard normal arrays (complex where the leaf is) shaped like ``tree``'s leaves: a
    cotangent no XLA simplification can fold away, unlike ones or a sum's."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten(
        [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def scans_only(shape, directions, axes) -> tuple[Callable, tuple]:
    """Forward+backward of the mixer's scans alone on complex (B, ..., d) decays and inputs
    (along each axis in place, as the mixer runs them)."""
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.random.uniform(keys[0], shape, jnp.float32, 0.5, 1.0) * jnp.exp(1j * 0.3)
    x = jax.lax.complex(*jax.random.normal(keys[1], (2,) + shape))

    def run(a, x):
        h = 0.0
        for direction in directions:
            for axis in axes:
                h = h + linear_recurrence(a, x, reverse=direction == "reverse", axis=axis)
        return h

    return forward_backward(run, (a, x), keys[2])


def interleaved(calls: dict[str, tuple[Callable, tuple]], reps: int) -> dict[str, tuple]:
    """``{name: (best seconds, spread)}``: every call once per round, ``reps`` rounds."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), max(t) / min(t)) for name, t in times.items()}


def train_step(model_name: str, length: int) -> tuple[Callable, tuple]:
    """The jitted training step of the model's CPU size (``train_throughput.py``) at ``length``
    tokens (a square grid for ``2d_mixer``) and its arguments."""
    task = "lm" if model_name == "lm" else "lra"
    scan = "2d" if model_name == "2d_mixer" else "1d"
    args = argparse.Namespace(task=task, full=False, methods=["auto"], scan=scan, length=length)
    models, _, loss, vocab = builders(args, None)
    step, state = train_step_fn(models["hgrn[auto]"](), loss)
    batch = 1 if task == "lm" else 8
    ids = random_tokens(batch, length, vocab)
    return step, (*state, ids)


def by_source(
    model_name: str, length: int, step_call: tuple[Callable, tuple], rounds: int
) -> list[dict]:
    """Rows ``{source, forward_ms, backward_ms, ms, share}`` of the model's training step
    ``step_call`` (``(step, args)`` of :func:`train_step`;
    :func:`benchmarks.step_trace.attribute`), largest first."""
    step, args = step_call
    merged: dict[str, dict] = {}
    for row in attribute(step, *args, rounds=rounds):
        entry = merged.setdefault(
            row["source"],
            dict(
                model=model_name,
                length=length,
                part="by source",
                source=row["source"],
                forward_ms=0.0,
                backward_ms=0.0,
                ms=0.0,
                share=0.0,
                loops=0,
            ),
        )
        entry[f"{row['pass']}_ms"] += row["ms"]
        entry["ms"] += row["ms"]
        entry["share"] += row["share"]
        entry["loops"] += row["loops"]
    return sorted(merged.values(), key=lambda row: -row["ms"])


def profile(model_name: str, length: int, reps: int) -> tuple[list[dict], tuple[Callable, tuple]]:
    """The stage rows of the model at ``length``, and its training step as timed (``(step,
    args)``, for :func:`by_source`)."""
    task = "lm" if model_name == "lm" else "lra"
    sizes = SMALL if task == "lm" else SMALL_LRA
    batch = 1 if task == "lm" else 8
    d, layers = sizes["features"], sizes["num_layers"]
    if model_name == "lm":
        mixer = HGRU(d, bidirectional=False, rngs=nnx.Rngs(0))
        directions, axes, shape = ("forward",), (1,), (batch, length, d)
    elif model_name == "lra_text":
        mixer = HGRU(d, bidirectional=True, rngs=nnx.Rngs(0))
        directions, axes, shape = ("forward", "reverse"), (1,), (batch, length, d)
    else:  # the 2-D mixer on a square grid of about `length` cells
        side = int(math.isqrt(length))
        mixer = HGRU2D(d, causal=False, rngs=nnx.Rngs(0))
        directions, axes, shape = ("forward", "reverse"), (1, 2), (batch, side, side, d)
    x = jax.random.normal(jax.random.key(1), shape)
    calls = {stage: stage_fn(mixer, stage, directions, axes, x) for stage in STAGES}
    calls["scans alone"] = scans_only(shape[:-1] + (d,), directions, axes)
    calls["train step"] = train_step(model_name, math.prod(shape[1:-1]))
    timed = interleaved(calls, reps)
    rows = []
    previous = 0.0
    for name, (seconds, spread) in timed.items():
        row = dict(model=model_name, length=length, part=name, ms=seconds * 1e3, spread=spread)
        if name in STAGES:
            row["stage_ms"] = (seconds - previous) * 1e3
            previous = seconds
        rows.append(row)
    rows.append(
        dict(
            model=model_name,
            length=length,
            part="mixers_share",
            ms=layers * timed["layer"][0] * 1e3,
            share=layers * timed["layer"][0] / timed["train step"][0],
        )
    )
    for row in rows:
        if row["part"] in STAGES or row["part"] == "scans alone":
            row["share_of_layer"] = row.get("stage_ms", row["ms"]) / (timed["layer"][0] * 1e3)
    return rows, calls["train step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["lra_text", "lm", "2d_mixer"],
        choices=["lra_text", "lm", "2d_mixer"],
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--trace-rounds",
        type=int,
        default=3,
        help="traced steps per model and length (each operation's fastest is kept); 0: no trace",
    )
    parser.add_argument("--top", type=int, default=12, help="sources printed per step")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows: list[dict] = []
    stage_columns = ["model", "length", "part", "ms", "stage_ms", "share_of_layer", "share"]
    source_columns = ["model", "length", "source", "forward_ms", "backward_ms", "share", "loops"]
    for model_name in args.models:
        for length in args.lengths:
            stages, step_call = profile(model_name, length, args.reps)
            print(format_table(stages, stage_columns + ["spread"]), flush=True)
            rows += stages
            if args.trace_rounds:
                sources = by_source(model_name, length, step_call, args.trace_rounds)
                print(format_table(sources[: args.top], source_columns), flush=True)
                rows += sources
    meta = dict(
        lra_text=dict(SMALL_LRA, batch=8, full_size=LRA_TEXT),
        lm=dict(SMALL, batch=1),
        stages=list(STAGES),
        reps=args.reps,
        timing="best of reps interleaved rounds",
        trace_rounds=args.trace_rounds,
        by_source="summed XLA operation time of one traced training step per crediting "
        "source line (benchmarks/step_trace.py); shares of the sum, which exceeds the wall "
        "time (two threads); traced loops read slower than untraced",
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
    )
    print("wrote", write_results("profile_step", rows, meta))


if __name__ == "__main__":
    main()
