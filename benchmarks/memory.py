"""Peak training memory against sequence length, with and without rematerialisation.

    python benchmarks/memory.py [--lengths 512 1024 ... 16384] [--models pathx lm]
                                [--remat none nothing dots] [--dtype float32|bfloat16]

For each model, length and remat policy it compiles one jitted training gradient step (loss,
``jax.grad`` over the parameters, BatchNorm statistics and RNG counters updated, as in
``hgrn_jax.training``) and reads XLA's compiled memory analysis: peak = temp + argument +
output bytes. Nothing is executed, so lengths beyond the machine's memory are fine.

Models:
- ``pathx``: the LRA Path-X classifier (``HGRNClassifier``: 2-D HGRU, 6 layers, d 64, GLU
  expand 1, BatchNorm, linear pixel encoder, 2 classes), batch 16 as in the paper, on an
  H x W grid with H * W = L (Path-X itself is 128 x 128 = 16384).
- ``lm``: the WikiText-103 LM (``HGRNLM(LMConfig())``: 6 layers, d 512, vocab 50264), batch 1.

On CPU, XLA's ``cse_barrier_expander`` pass removes the barriers that keep remat's recomputation
apart (remat then saves nothing), so this script disables that pass when jax has no GPU or TPU
plugin; GPU and TPU keep the barriers anyway. Results: ``benchmarks/results/memory_<platform>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

if all(
    importlib.util.find_spec(m) is None
    for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_disable_hlo_passes=cse_barrier_expander"
    ).strip()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import format_table, write_results
from hgrn_jax.nn import HGRNLM, LMConfig, MixerConfig
from hgrn_jax.nn.classifier import ClassifierConfig, HGRNClassifier
from hgrn_jax.nn.remat import set_remat

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
PATHX_BATCH, LM_BATCH = 16, 1


def grid_shape(length: int) -> tuple[int, int]:
    """The most square H x W = length grid with H <= W (length a power of two)."""
    height = 2 ** (int(math.log2(length)) // 2)
    return height, length // height


def pathx_setup(length: int, dtype):
    config = ClassifierConfig(
        num_classes=2,
        features=64,
        num_layers=6,
        glu_expand=1,
        encoder="linear",
        input_channels=1,
        mixer=MixerConfig(scan="2d"),
        grid_shape=grid_shape(length),
        norm="batch",
    )
    build = lambda: HGRNClassifier(config, dtype=dtype, rngs=nnx.Rngs(0))
    batch = (
        jax.ShapeDtypeStruct((PATHX_BATCH, length), jnp.float32),
        jax.ShapeDtypeStruct((PATHX_BATCH,), jnp.int32),
    )

    def loss(model, pixels, labels):
        logits = model(pixels).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return build, batch, loss


def lm_setup(length: int, dtype):
    build = lambda: HGRNLM(LMConfig(), dtype=dtype, rngs=nnx.Rngs(0))
    batch = (jax.ShapeDtypeStruct((LM_BATCH, length + 1), jnp.int32),)

    def loss(model, ids):
        logits = model(ids[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return build, batch, loss


SETUPS = {"pathx": pathx_setup, "lm": lm_setup}


def grad_step_memory(build, batch, loss_fn, remat: str | None) -> dict[str, int]:
    """Compiled memory of one training gradient step, from abstract shapes only."""
    model = nnx.eval_shape(build)
    set_remat(model, remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, rest, *batch):
        def loss(params):
            fresh = jax.tree.map(lambda v: v, (params, rest))  # Variables of this trace
            m = nnx.merge(graphdef, *fresh)
            m.train()
            return loss_fn(m, *batch), nnx.split(m, nnx.Param, ...)[2]

        return jax.grad(loss, has_aux=True)(params)

    analysis = jax.jit(step).lower(params, rest, *batch).compile().memory_analysis()
    out = {
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
    }
    out["peak_bytes"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument(
        "--remat",
        nargs="+",
        default=["none", "nothing"],
        help="policies of hgrn_jax.nn.remat, or 'none'",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = None if args.dtype == "float32" else jnp.bfloat16

    rows = []
    for model_name in args.models:
        for remat in args.remat:
            previous = None
            for length in args.lengths:
                build, batch, loss = SETUPS[model_name](length, dtype)
                memory = grad_step_memory(build, batch, loss, None if remat == "none" else remat)
                row = {
                    "model": model_name,
                    "remat": remat,
                    "dtype": args.dtype,
                    "length": length,
                    **memory,
                    "peak_MiB": memory["peak_bytes"] / 2**20,
                    "temp_MiB": memory["temp_bytes"] / 2**20,
                }
                if previous is not None:  # growth per added token: constant when linear
                    row["KiB_per_token"] = (
                        (memory["peak_bytes"] - previous["peak_bytes"])
                        / (length - previous["length"])
                        / 1024
                    )
                previous = {"length": length, **memory}
                rows.append(row)
                print(
                    format_table(
                        [row], ["model", "remat", "length", "peak_MiB", "temp_MiB", "KiB_per_token"]
                    ).splitlines()[-1],
                    flush=True,
                )
    columns = ["model", "remat", "dtype", "length", "peak_MiB", "temp_MiB", "KiB_per_token"]
    print(format_table(rows, columns))
    meta = {
        "batch": {"pathx": PATHX_BATCH, "lm": LM_BATCH},
        "peak": "temp + argument + output bytes of the compiled grad step",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print("wrote", write_results("memory", rows, meta))


if __name__ == "__main__":
    main()
