"""Training throughput and peak memory: HGRN against a same-size Transformer, for the LM and
for an LRA classifier.

    python benchmarks/train_throughput.py [--task lm|lra] [--full] [--lengths 512 1024 ...]
                                          [--batch N] [--reps 3] [--dtype float32|bfloat16]
                                          [--methods auto pallas chunked ...]

Both models have the same width, depth, vocabulary, GLU channel mixer and tied embeddings; the
token mixer differs: the paper's complex HGRU (``HGRNLM``) or causal multi-head softmax
attention (``jax.nn.dot_product_attention(..., is_causal=True)``, head size 64). One training
step is the loss, ``jax.grad`` and an AdamW update, jitted; tokens per second = batch * length /
median step time, and peak memory = temp + argument + output bytes of the compiled step.

Sizes: the default is a small CPU model (d 128, 2 layers, vocab 1024, L 512-4096); ``--full`` is
the WikiText-103 model (d 512, 6 layers, vocab 50264, GLU 1024, L 512-16384), meant for a GPU.
``--task lra``: the LRA Text classifier (1-D bidirectional complex HGRU, BatchNorm, d 128, 4 layers,
vocabulary 135, 2 classes, mean pooling; batch 8) against a Transformer encoder of the same width
and depth (non-causal attention, LayerNorm, the same GLU, mean pooling); the loss is the
classification cross-entropy. ``--methods`` runs one HGRN row per recurrence method.
Results (rewritten after every row): ``benchmarks/results/train_throughput[_full][_lra]_<platform>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import format_table, time_fn, write_results
from hgrn_jax.nn import GLU, HGRNLM, LMConfig
from hgrn_jax.nn.classifier import ClassifierConfig, HGRNClassifier
from hgrn_jax.nn.glu import glu_width

SMALL = dict(vocab_size=1024, features=128, num_layers=2, glu_expand=2)
FULL = dict(vocab_size=50264, features=512, num_layers=6, glu_expand=2)
SMALL_LENGTHS, FULL_LENGTHS = (512, 1024, 2048, 4096), (512, 1024, 2048, 4096, 8192, 16384)
LRA_TEXT = dict(vocab_size=135, features=128, num_layers=4, num_classes=2)
SMALL_LRA = dict(vocab_size=135, features=32, num_layers=2, num_classes=2)
HEAD_DIM = 64


class CausalAttention(nnx.Module):
    """Multi-head causal softmax attention (B, L, d) -> (B, L, d)."""

    def __init__(self, d: int, *, dtype, rngs: nnx.Rngs, causal: bool = True):
        self.heads = max(1, d // HEAD_DIM)
        self.causal = causal
        self.qkv = nnx.Linear(d, 3 * d, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, d = x.shape
        q, k, v = jnp.split(
            self.qkv(x).reshape(batch, length, 3 * self.heads, d // self.heads), 3, axis=2
        )
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.reshape(batch, length, d))


class TransformerBlock(nnx.Module):
    """``x + attention(norm(x))`` then ``x + glu(norm(x))``."""

    def __init__(
        self,
        d: int,
        glu_hidden: int,
        *,
        dtype,
        rngs: nnx.Rngs,
        causal: bool = True,
        act: str = "silu",
    ):
        self.norm1 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.attention = CausalAttention(d, dtype=dtype, rngs=rngs, causal=causal)
        self.norm2 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.mlp = GLU(d, glu_hidden, act=act, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerLM(nnx.Module):
    """Pre-norm causal Transformer with the HGRN LM's embedding, GLU, norms and tied head."""

    def __init__(self, config: LMConfig, *, dtype=None, rngs: nnx.Rngs):
        d = config.features
        self.embed = nnx.Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                TransformerBlock(
                    d,
                    glu_width(config.glu_expand, d),
                    dtype=dtype,
                    rngs=rngs,
                    act=config.glu_activation,
                )
                for _ in range(config.num_layers)
            ]
        )
        self.final_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.scale = d**0.5

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids) * self.scale
        for layer in self.layers:
            x = layer(x)
        return self.embed.attend(self.final_norm(x))


class TransformerClassifier(nnx.Module):
    """Transformer encoder classifier: embedding, non-causal blocks, mean pooling, head."""

    def __init__(self, config: ClassifierConfig, *, dtype=None, rngs: nnx.Rngs):
        d = config.features
        self.embed = nnx.Embed(config.vocab_size, d, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                TransformerBlock(
                    d, glu_width(config.glu_expand, d), dtype=dtype, rngs=rngs, causal=False
                )
                for _ in range(config.num_layers)
            ]
        )
        self.final_norm = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(d, config.num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final_norm(x).mean(axis=1))


def next_token_loss(logits_fn, ids: jax.Array) -> jax.Array:
    """``ids`` (B, L + 1): predict tokens 1..L from 0..L-1."""
    logits = logits_fn(ids[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def classification_loss(logits_fn, ids: jax.Array) -> jax.Array:
    """``ids`` (B, L + 1): the sequence ``ids[:, 1:]`` and its label ``ids[:, 0] % 2``."""
    logits = logits_fn(ids[:, 1:]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 0] % 2).mean()


def train_step_fn(model: nnx.Module, loss=next_token_loss):
    """A jitted ``(params, rest, opt_state, ids) -> (params, opt_state, loss)`` and its state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)

    def loss_fn(params, rest, ids):
        model = nnx.merge(graphdef, *jax.tree.map(lambda v: v, (params, rest)))
        return loss(model, ids)

    @jax.jit
    def step(params, rest, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, (params, rest, opt_state)


def parameter_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def with_method(config, method: str):
    """``config`` with its mixer's recurrence method set to ``method``."""
    return dataclasses.replace(config, mixer=dataclasses.replace(config.mixer, method=method))


def builders(args, dtype) -> tuple[dict, dict, object, int]:
    """``({row name: model factory}, sizes, loss, vocabulary size)`` for the task."""
    if args.task == "lm":
        sizes = FULL if args.full else SMALL
        config = LMConfig(**sizes)
        models = {
            f"hgrn[{m}]": (
                lambda m=m: HGRNLM(with_method(config, m), dtype=dtype, rngs=nnx.Rngs(0))
            )
            for m in args.methods
        }
        models["transformer"] = lambda: TransformerLM(config, dtype=dtype, rngs=nnx.Rngs(0))
        return models, sizes, next_token_loss, config.vocab_size
    sizes = LRA_TEXT if args.full else SMALL_LRA
    config = ClassifierConfig(**sizes, encoder="embed", norm="batch")
    models = {
        f"hgrn[{m}]": (
            lambda m=m: HGRNClassifier(with_method(config, m), dtype=dtype, rngs=nnx.Rngs(0))
        )
        for m in args.methods
    }
    models["transformer"] = lambda: TransformerClassifier(config, dtype=dtype, rngs=nnx.Rngs(0))
    return models, sizes, classification_loss, config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="lm", choices=["lm", "lra"])
    parser.add_argument("--full", action="store_true", help="the paper's model size")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--batch", type=int, help="default 1 (lm) or 8 (lra)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--methods", nargs="+", default=["auto"], help="recurrence methods: one HGRN row each"
    )
    args = parser.parse_args()
    batch = args.batch or (1 if args.task == "lm" else 8)
    lengths = args.lengths or (FULL_LENGTHS if args.full else SMALL_LENGTHS)
    dtype = None if args.dtype == "float32" else jnp.bfloat16
    models, sizes, loss, vocab_size = builders(args, dtype)
    name = (
        "train_throughput" + ("_full" if args.full else "") + ("_lra" if args.task == "lra" else "")
    )
    meta = {
        "task": args.task,
        "config": sizes,
        "batch": batch,
        "dtype": args.dtype,
        "parameters": {},
        "attention": "jax.nn.dot_product_attention, head size "
        f"{HEAD_DIM}, {'causal' if args.task == 'lm' else 'non-causal'}",
        "step": "loss + grad + AdamW update, jitted",
    }
    rows: list[dict] = []
    for length in lengths:
        ids = jax.random.randint(jax.random.key(length), (batch, length + 1), 0, vocab_size)
        for model_name, build in models.items():
            model = build()
            meta["parameters"][model_name] = parameter_count(model)
            step, state = train_step_fn(model, loss)
            try:
                memory = step.lower(*state, ids).compile().memory_analysis()
                seconds = time_fn(step, *state, ids, reps=args.reps)["median"]
            except Exception as error:  # e.g. out of memory: report it and go on
                print(
                    f"{model_name} L={length}: FAILED {type(error).__name__}: {str(error)[:1000]}",
                    flush=True,
                )
                continue
            peak = (
                memory.temp_size_in_bytes
                + memory.argument_size_in_bytes
                + memory.output_size_in_bytes
            )
            row = {
                "model": model_name,
                "length": length,
                "step_ms": seconds * 1e3,
                "tokens_per_s": batch * length / seconds,
                "peak_MiB": peak / 2**20,
            }
            rows.append(row)
            print(format_table([row], list(row)).splitlines()[-1], flush=True)
            add_speedups(rows)
            write_results(name, rows, meta)
    print(
        format_table(
            rows, ["model", "length", "step_ms", "tokens_per_s", "peak_MiB", "x_transformer"]
        )
    )
    print("wrote", write_results(name, rows, meta))


def add_speedups(rows: list[dict]) -> None:
    """``x_transformer``: each row's tokens/s over the Transformer's at the same length."""
    for row in rows:
        other = next(
            (r for r in rows if r["length"] == row["length"] and r["model"] == "transformer"), None
        )
        row["x_transformer"] = row["tokens_per_s"] / other["tokens_per_s"] if other else None


if __name__ == "__main__":
    main()
