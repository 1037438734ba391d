"""HGRN2 LM vs HGRN LM of the same width and depth: training tokens/s and decode ms/token.

Two tables from one run (the machine may be shared, so compare ratios within a run):

- ``train``: tokens per second of one jitted training step (forward, next-token cross-entropy,
  backward) of the HGRN LM (complex HGRU mixers) and the HGRN2 LM (hgru2-pytorch's HGRN2 mixer,
  ``--expand-ratio`` wide heads; also fla's layout with ``--fla``) at each ``--lengths`` value,
  batch ``--batch``; median of ``--reps`` timed calls after compilation. ``vs_hgrn`` is the ratio
  to the HGRN LM at the same length.
- ``decode``: greedy decoding time per token (batch 1) after prefilling each ``--contexts`` value,
  timed round-robin exactly as ``benchmarks/generate.py`` does; the recurrent state (``cache_MiB``)
  is (d,) complex per layer for HGRN and (H, K, V) for HGRN2, so both are flat in the context.

    python benchmarks/hgrn2.py                                  # d 128 x 2, vocab 1024 (CPU)
    python benchmarks/hgrn2.py --full                           # the WikiText-103 sizes
    python benchmarks/hgrn2.py --lengths 128 --contexts 64 --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import format_table, time_fn, write_results
from benchmarks.generate import prepare, time_round_robin
from hgrn_jax.nn import HGRNLM, LMConfig, MixerConfig

SMALL = dict(vocab_size=1024, features=128, num_layers=2)
FULL = dict(vocab_size=50264, features=512, num_layers=6)


def lm_configs(sizes: dict, expand_ratio: int, fla: bool) -> dict[str, LMConfig]:
    """The models compared: same width, depth, GLU, norms and embeddings; only the mixer differs."""
    base = LMConfig(**sizes)
    configs = {
        "hgrn": base,
        f"hgrn2[e={expand_ratio}]": dataclasses.replace(
            base, mixer=MixerConfig(kind="hgrn2", expand_ratio=expand_ratio)
        ),
    }
    if fla:
        configs[f"hgrn2-fla[e={expand_ratio}]"] = dataclasses.replace(
            base,
            mixer=MixerConfig(
                kind="hgrn2", layout="fla", expand_ratio=expand_ratio, use_bias=False
            ),
        )
    return configs


def next_token_loss(model: nnx.Module, ids: jax.Array) -> jax.Array:
    logits = model(ids[:, :-1]).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))


def train_rows(
    configs: dict[str, LMConfig], lengths: list[int], batch: int, reps: int
) -> list[dict]:
    rows = []
    for length in lengths:
        ids = jax.random.randint(
            jax.random.key(length), (batch, length + 1), 0, next(iter(configs.values())).vocab_size
        )
        hgrn_seconds = None
        for name, config in configs.items():
            graphdef, params, rest = nnx.split(HGRNLM(config, rngs=nnx.Rngs(0)), nnx.Param, ...)

            @jax.jit
            def step(params, rest, ids, graphdef=graphdef):
                return jax.value_and_grad(
                    lambda p: next_token_loss(nnx.merge(graphdef, p, rest), ids)
                )(params)

            seconds = time_fn(step, params, rest, ids, reps=reps)["median"]
            hgrn_seconds = hgrn_seconds or seconds
            rows.append(
                {
                    "model": name,
                    "length": length,
                    "batch": batch,
                    "tokens_per_s": batch * length / seconds,
                    "step_ms": 1e3 * seconds,
                    "vs_hgrn": hgrn_seconds / seconds,
                }
            )
            print(f"timed {name} at length {length}", flush=True)
    return rows


def decode_rows(
    configs: dict[str, LMConfig], contexts: list[int], steps: int, reps: int
) -> list[dict]:
    rows, runs = [], []
    for context in contexts:
        for name, config in configs.items():
            model = HGRNLM(config, rngs=nnx.Rngs(0))
            row, run = prepare(name, model, context, steps, lambda m=model: m.init_cache(1), {})
            rows.append(row)
            runs.append(run)
            print(f"prepared {name} at context {context}", flush=True)
    for row, seconds in zip(rows, time_round_robin(runs, reps)):
        row["ms_per_token"] = 1e3 * statistics.median(seconds) / steps
        row["ms_per_token_min"] = 1e3 * min(seconds) / steps
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="d 512 x 6, vocab 50264")
    parser.add_argument(
        "--expand-ratio",
        type=int,
        default=None,
        help="HGRN2 head width (default 32; 128 with --full)",
    )
    parser.add_argument("--fla", action="store_true", help="also fla's HGRN2 layout")
    parser.add_argument("--lengths", default="256,1024")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--contexts", default="128,1024,4096")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--name", default="hgrn2", help="results file benchmarks/results/<name>_<platform>.json"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    sizes = FULL if args.full else SMALL
    expand_ratio = args.expand_ratio or (128 if args.full else 32)
    configs = lm_configs(sizes, expand_ratio, args.fla)

    train = train_rows(configs, [int(n) for n in args.lengths.split(",")], args.batch, args.reps)
    decode = decode_rows(configs, [int(n) for n in args.contexts.split(",")], args.steps, args.reps)
    print(format_table(train, ["model", "length", "batch", "tokens_per_s", "step_ms", "vs_hgrn"]))
    print(
        format_table(
            decode,
            ["model", "context", "ms_per_token", "ms_per_token_min", "prefill_s", "cache_MiB"],
        )
    )
    if not args.no_write:
        params = {
            name: sum(
                x.size
                for x in jax.tree.leaves(
                    nnx.state(nnx.eval_shape(lambda c=c: HGRNLM(c, rngs=nnx.Rngs(0))), nnx.Param)
                )
            )
            for name, c in configs.items()
        }
        meta = dict(
            vars(args),
            sizes=sizes,
            expand_ratio=expand_ratio,
            parameters=params,
            note="train: median of reps jitted value_and_grad calls of the next-token "
            "loss after compilation; decode: as benchmarks/generate.py "
            "(round-robin, median over reps of steps greedy tokens / steps)",
        )
        print("wrote", write_results(args.name, train + decode, meta))


if __name__ == "__main__":
    main()
