"""Training throughput and peak memory: the HGRN LM against a same-size causal Transformer.

    python benchmarks/train_throughput.py [--full] [--lengths 512 1024 ...] [--batch 1]
                                          [--reps 3] [--dtype float32|bfloat16]

Both models have the same width, depth, vocabulary, GLU channel mixer and tied embeddings; the
token mixer differs: the paper's complex HGRU (``HGRNLM``) or causal multi-head softmax
attention (``jax.nn.dot_product_attention(..., is_causal=True)``, head size 64). One training
step is the loss, ``jax.grad`` and an AdamW update, jitted; tokens per second = batch * length /
median step time, and peak memory = temp + argument + output bytes of the compiled step.

Sizes: the default is a small CPU model (d 128, 2 layers, vocab 1024, L 512-4096); ``--full`` is
the WikiText-103 model (d 512, 6 layers, vocab 50264, GLU 1024, L 512-16384), meant for a GPU.
Results: ``benchmarks/results/train_throughput_<platform>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import format_table, time_fn, write_results  # noqa: E402
from hgrn_jax.nn import GLU, HGRNLM, LMConfig  # noqa: E402

SMALL = dict(vocab_size=1024, features=128, num_layers=2, glu_hidden=256)
FULL = dict(vocab_size=50264, features=512, num_layers=6, glu_hidden=1024)
SMALL_LENGTHS, FULL_LENGTHS = (512, 1024, 2048, 4096), (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIM = 64


class CausalAttention(nnx.Module):
    """Multi-head causal softmax attention (B, L, d) -> (B, L, d)."""

    def __init__(self, d: int, *, dtype, rngs: nnx.Rngs):
        self.heads = d // HEAD_DIM
        self.qkv = nnx.Linear(d, 3 * d, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(batch, length, 3 * self.heads, HEAD_DIM), 3,
                            axis=2)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.reshape(batch, length, d))


class TransformerBlock(nnx.Module):
    """``x + attention(norm(x))`` then ``x + glu(norm(x))``."""

    def __init__(self, config: LMConfig, *, dtype, rngs: nnx.Rngs):
        d = config.features
        self.norm1 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.attention = CausalAttention(d, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.mlp = GLU(d, config.glu_hidden, act=config.glu_activation, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerLM(nnx.Module):
    """Pre-norm causal Transformer with the HGRN LM's embedding, GLU, norms and tied head."""

    def __init__(self, config: LMConfig, *, dtype=None, rngs: nnx.Rngs):
        d = config.features
        self.embed = nnx.Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([TransformerBlock(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.scale = d ** 0.5

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids) * self.scale
        for layer in self.layers:
            x = layer(x)
        return self.embed.attend(self.final_norm(x))


def train_step_fn(model: nnx.Module):
    """A jitted ``(params, rest, opt_state, ids) -> (params, opt_state, loss)`` and its state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def loss_fn(params, rest, ids):
        model = nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, rest)))
        logits = model(ids[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(params, rest, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, rest, opt_state)


def parameter_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the WikiText-103 model size")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    sizes = FULL if args.full else SMALL
    lengths = args.lengths or (FULL_LENGTHS if args.full else SMALL_LENGTHS)
    dtype = None if args.dtype == "float32" else jnp.bfloat16
    config = LMConfig(**sizes)
    builders = {
        "hgrn": lambda: HGRNLM(config, dtype=dtype, rngs=nnx.Rngs(0)),
        "transformer": lambda: TransformerLM(config, dtype=dtype, rngs=nnx.Rngs(0)),
    }
    rows, params = [], {}
    for length in lengths:
        ids = jax.random.randint(jax.random.key(length), (args.batch, length + 1), 0,
                                 config.vocab_size)
        for name, build in builders.items():
            model = build()
            params[name] = parameter_count(model)
            step, state = train_step_fn(model)
            memory = step.lower(*state, ids).compile().memory_analysis()
            peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                    + memory.output_size_in_bytes)
            seconds = time_fn(step, *state, ids, reps=args.reps)["median"]
            row = {"model": name, "length": length, "step_ms": seconds * 1e3,
                   "tokens_per_s": args.batch * length / seconds, "peak_MiB": peak / 2**20}
            rows.append(row)
            print(format_table([row], list(row)).splitlines()[-1], flush=True)
    for row in rows:
        other = next(r for r in rows if r["length"] == row["length"] and r is not row)
        row["speedup_vs_other"] = row["tokens_per_s"] / other["tokens_per_s"]
    print(format_table(rows, ["model", "length", "step_ms", "tokens_per_s", "peak_MiB",
                              "speedup_vs_other"]))
    meta = {"config": sizes, "batch": args.batch, "dtype": args.dtype, "parameters": params,
            "attention": f"jax.nn.dot_product_attention, causal, head size {HEAD_DIM}",
            "step": "loss + grad + AdamW update, jitted",
            "hgrn_method": config.method}
    suffix = "_full" if args.full else ""
    print("wrote", write_results(f"train_throughput{suffix}", rows, meta))


if __name__ == "__main__":
    main()
