"""Where one training step's time goes: the HGRU mixer taken apart, next to the whole step.

    python benchmarks/profile_step.py [--lengths 1024 4096] [--reps 5]

For the LRA Text classifier (1-D bidirectional complex HGRU; the small CPU size of
``benchmarks/train_throughput.py --task lra``, batch 8), the WikiText-103 LM (causal complex
HGRU; the small CPU size, batch 1) and the 2-D mixer (four scans over a sqrt(L) x sqrt(L) grid,
the classifier's width), at each length it times forward+backward (a VJP with respect to the
input and every parameter) of nested prefixes of one mixer layer at the model's (B, L, d)::

    projections   the input, lambda and gate projections (one fused matmul, ``projections()``)
    gates         + silu / sigmoid / the complex input (``decay_and_input``)
    scans         + the decays (lam * exp(i theta)) and every scan, summed
    layer         + [Re h | Im h], LayerNorm, output gate and output projection (the whole
                  mixer)

and the scans alone (``linear_recurrence`` on the (B, L, d) complex decays and inputs, once per
direction/axis), so each stage's share is the difference to the previous one. The whole train
step (loss, gradient, AdamW) is timed with it; ``mixers_share`` = layers x mixer time / step
time, the rest being embedding, norms, GLU, loss and the optimizer. Timings are the best of
``--reps`` interleaved rounds (one run; ``spread`` = slowest / fastest round shows the noise).
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
from benchmarks.train_throughput import LRA_TEXT, SMALL, SMALL_LRA, builders, train_step_fn
from hgrn_jax.nn import HGRU, HGRU2D
from hgrn_jax.ops import linear_recurrence

STAGES = ("projections", "gates", "scans", "layer")


def stage_fn(
    mixer: nnx.Module, stage: str, directions: tuple[str, ...], axes: tuple[int, ...]
) -> Callable:
    """``(params, x) -> array``: the mixer computed up to ``stage`` (see the module docstring)."""
    graphdef, state = nnx.split(mixer)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        projected = m.projections(x)
        if stage == "projections":
            return sum(jnp.sum(o) for o in projected if o is not None)
        lam, b = m.decay_and_input(x, 0.5, projected)
        if stage == "gates":
            return jnp.sum(lam) + jnp.sum(jnp.abs(b))
        h = 0.0
        for direction in directions:
            for axis in axes:
                h = h + m.scan(m.decay(lam, direction), b, direction, axis=axis)
        if stage == "scans":
            return jnp.sum(jnp.abs(h))
        return jnp.sum(m.output(h, x, gate=projected[2]))

    grad = jax.grad(run, argnums=(0, 1))
    return jax.jit(lambda x: grad(state, x))


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
        return jnp.sum(jnp.abs(h))

    return jax.jit(jax.grad(run, argnums=(0, 1))), (a, x)


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


def profile(model_name: str, length: int, reps: int) -> list[dict]:
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
    calls = {stage: (stage_fn(mixer, stage, directions, axes), (x,)) for stage in STAGES}
    calls["scans alone"] = scans_only(shape[:-1] + (d,), directions, axes)
    if model_name != "2d_mixer":
        args = argparse.Namespace(task=task, full=False, methods=["auto"])
        models, _, loss, vocab = builders(args, None)
        step, state = train_step_fn(models["hgrn[auto]"](), loss)
        ids = jax.random.randint(jax.random.key(length), (batch, length + 1), 0, vocab)
        calls["train step"] = (step, (*state, ids))
    timed = interleaved(calls, reps)
    rows = []
    previous = 0.0
    for name, (seconds, spread) in timed.items():
        row = dict(model=model_name, length=length, part=name, ms=seconds * 1e3, spread=spread)
        if name in STAGES:
            row["stage_ms"] = (seconds - previous) * 1e3
            previous = seconds
        rows.append(row)
    if "train step" in timed:
        step_s = timed["train step"][0]
        rows.append(
            dict(
                model=model_name,
                length=length,
                part="mixers_share",
                ms=layers * timed["layer"][0] * 1e3,
                share=layers * timed["layer"][0] / step_s,
            )
        )
    for row in rows:
        if row["part"] in STAGES or row["part"] == "scans alone":
            row["share_of_layer"] = row.get("stage_ms", row["ms"]) / (timed["layer"][0] * 1e3)
    return rows


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
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows: list[dict] = []
    for model_name in args.models:
        for length in args.lengths:
            rows += profile(model_name, length, args.reps)
            print(
                format_table(
                    rows[-8:],
                    [
                        "model",
                        "length",
                        "part",
                        "ms",
                        "stage_ms",
                        "share_of_layer",
                        "share",
                        "spread",
                    ],
                ),
                flush=True,
            )
    meta = dict(
        lra_text=dict(SMALL_LRA, batch=8, full_size=LRA_TEXT),
        lm=dict(SMALL, batch=1),
        stages=list(STAGES),
        reps=args.reps,
        timing="best of reps interleaved rounds",
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
    )
    print("wrote", write_results("profile_step", rows, meta))


if __name__ == "__main__":
    main()
