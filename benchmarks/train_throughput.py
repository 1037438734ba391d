"""Training throughput and peak memory: HGRN against a same-size Transformer, for the LM and
for an LRA classifier.

    python benchmarks/train_throughput.py [--task lm|lra] [--scan 1d|2d] [--full]
                                          [--lengths 512 1024 ...] [--batch N] [--reps 3]
                                          [--dtype float32|bfloat16] [--methods auto ...]
                                          [--variants after before ...]

Both models have the same width, depth, vocabulary, GLU channel mixer and tied embeddings; the
token mixer differs: the paper's complex HGRU (``HGRNLM``) or causal multi-head softmax
attention (``jax.nn.dot_product_attention(..., is_causal=True)``, head size 64). One training
step is the loss, ``jax.grad`` and an AdamW update, jitted; tokens per second = batch * length /
fastest step time (of interleaved rounds), and peak memory = temp + argument + output bytes of
the compiled step. ``step_ops``: the instructions of the compiled step that do work
(``benchmarks.common.step_op_counts``; loop bodies once), on a GPU about its kernel launches,
whose fixed cost weighs on short steps (per opcode in the JSON's ``meta.step_ops``).

Sizes: the default is a small CPU model (d 128, 2 layers, vocab 1024, L 512-4096); ``--full`` is
the WikiText-103 model (d 512, 6 layers, vocab 50264, GLU 1024, L 512-16384), meant for a GPU.
``--task lra``: the LRA Text classifier (1-D bidirectional complex HGRU, BatchNorm, vocabulary
135, 2 classes, mean pooling; batch 8; d 32 and 2 layers on CPU, d 128 and 4 layers with
``--full``) against a Transformer encoder of the same width
and depth (non-causal attention, LayerNorm, the same GLU, mean pooling); the loss is the
classification cross-entropy. ``--scan 2d`` (LRA only) gives the classifier the 2-D mixer (four
scans over a sqrt(L) x sqrt(L) grid, LRA Image / Pathfinder; L must be a square). ``--methods``
runs one HGRN row per recurrence method.

``--variants`` adds HGRN rows with speed changes undone or forced, all compiled first and then
timed in interleaved rounds with the Transformer, so before/after ratios come from one run
(``VARIANTS``): ``before`` undoes every change; ``transposed scans`` and ``scan as before`` undo
one each (the 2-D mixer's scans by ``moveaxis`` copies to and from the time axis; the
recurrence's zero-filled loop buffers and 8-step unrolling); ``scan not in place`` runs the
recurrence's previous loops (results in fresh buffers, 2 steps per iteration) instead of the
loops that write over their inputs; ``fused projections`` forces the
three input projections into one matmul (the default off CPU only, ``hgru.fuse_projections``)
and ``separate projections`` forces three (the default on CPU); ``norm scale last`` (LayerNorm
as ``(x - mean) * rsqrt(var + eps) * scale + bias``, not Flax's full-size ``rsqrt * scale``
product) and ``gate recomputed`` (the mixer's ``norm * silu(gate)`` under ``jax.checkpoint``)
force two changes that were tried and not adopted; ``directions in one scan`` and
``directions in two scans`` run a bidirectional HGRU's two scans as one call or as two
(``hgru.MERGE_DIRECTIONS``; by default merged for XLA's parallel scans, not for the Pallas
kernel nor the sequential loop, ``hgru.merge_directions``; a row that would repeat the default
is left out); ``chained kernel`` and ``loads after stores`` (rows of ``--methods pallas``
only) run the Pallas kernel with the chunks' carries chained inside it
(``StreamingOptions.chain_in_kernel``, off until measured) and as it was timed on an H200
(``loads_ahead=False``: each step's loads after the previous step's stores); ``mosaic_gpu
kernel`` (``--methods pallas`` rows too) runs the kernels on Mosaic GPU
(``StreamingOptions.backend``);
``chained kernel, directions in one scan`` makes both launch cuts at once;
``batch norm by autodiff`` takes BatchNorm's gradient by autodiff, as ``nnx.BatchNorm`` does,
not in closed form (``hgrn_jax.ops.batch_norm``); ``phases per direction`` computes each scan
direction's ``exp(i theta)`` on its own (``HGRU.rotations`` shares one expression);
``as timed on the H200`` is the step an H200 timed on 2026-11-30 (two scans, autodiff's
BatchNorm gradient, the phases per direction, the kernel's loads after its stores), for any
method. Step time = the fastest of ``--reps`` interleaved rounds (``median_ms`` and ``spread``
= slowest / fastest are kept too): on a shared machine the fastest round is the one least
disturbed by other work. Rows interleaved in one process also share its heap, and a row's step
time can depend on what the rows before it left there (two variants looked 1.03-1.28x faster
that way and were within 3% in separate processes):
``--processes R`` times every row in child processes of its own instead, R alternating rounds
of ``--reps`` calls each.
Results (rewritten after every length): ``benchmarks/results/train_throughput[_full][_lra][_2d][_variants][TAG]_<platform>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import format_table, run_child, step_op_counts, write_results
from benchmarks.scan import ablated
from hgrn_jax.nn import GLU, HGRNLM, LMConfig, MixerConfig
from hgrn_jax.nn import hgru as hgru_module
from hgrn_jax.nn import norms as norms_module
from hgrn_jax.nn.classifier import ClassifierConfig, HGRNClassifier
from hgrn_jax.nn.glu import glu_width
from hgrn_jax.ops import METHODS, default_method, linear_recurrence, pallas_recurrence
from hgrn_jax.ops.pallas_recurrence import streaming_options

SMALL = dict(vocab_size=1024, features=128, num_layers=2, glu_expand=2)
FULL = dict(vocab_size=50264, features=512, num_layers=6, glu_expand=2)
SMALL_LENGTHS, FULL_LENGTHS = (512, 1024, 2048, 4096), (512, 1024, 2048, 4096, 8192, 16384)
LRA_TEXT = dict(vocab_size=135, features=128, num_layers=4, num_classes=2)
SMALL_LRA = dict(vocab_size=135, features=32, num_layers=2, num_classes=2)
HEAD_DIM = 64
TABLE_COLUMNS = [
    "model",
    "length",
    "step_ms",
    "tokens_per_s",
    "peak_MiB",
    "step_ops",
    "x_transformer",
    "x_before",
]

TIMED_ON_H200 = "as timed on the H200"
# What each --variants row changes: speed changes undone, or the projections forced one way
# ("after" is the code as it is).
CHANGES = (
    "separate projections",
    "axis-aware scans",
    "scan buffers and unroll",
    "in-place scans",
    "autodiff batch norm",
    "phases per direction",
)
VARIANTS = {
    "after": (),
    "before": CHANGES,
    "fused projections": ("fused projections",),
    "separate projections": ("separate projections",),
    "transposed scans": ("axis-aware scans",),
    "scan as before": ("scan buffers and unroll",),
    "scan not in place": ("in-place scans",),
    # The bidirectional HGRU's two scans as one call, or as two (hgru.merge_directions: merged
    # by default for XLA's parallel scans, not for the Pallas kernel nor the sequential loop).
    "directions in one scan": ("directions in one scan",),
    "directions in two scans": ("directions in two scans",),
    # The Pallas kernel as timed on an H200 (loads after stores), and with the carries chained
    # in the kernel (not yet on by default); rows of the "pallas" method only.
    "loads after stores": ("loads after stores",),
    "chained kernel": ("chained kernel",),
    # The same kernels on Mosaic GPU (StreamingOptions.backend; untimed when written).
    "mosaic_gpu kernel": ("mosaic_gpu kernel",),
    # Both launch cuts at once: a bidirectional HGRU's 4 kernel launches per layer, not 8 (+ chains).
    "chained kernel, directions in one scan": ("chained kernel", "directions in one scan"),
    # BatchNorm's gradient by autodiff, as nnx.BatchNorm has it (the closed form is the default).
    "batch norm by autodiff": ("autodiff batch norm",),
    # Each direction's sine and cosine of theta computed on their own (HGRU.rotations shares them).
    "phases per direction": ("phases per direction",),
    # The step as the H200 of 2026-11-30 timed it: two scans, autodiff's BatchNorm gradient, the
    # phases per direction and the kernel's loads after its stores (an HGRN row of any method;
    # gpu_compile.py matches it with the timed rows).
    TIMED_ON_H200: (
        "directions in two scans",
        "autodiff batch norm",
        "phases per direction",
        "loads after stores",
    ),
    # Tried and not adopted (no gain on CPU, benchmarks/README.md): forced on here.
    "norm scale last": ("norm scale last",),
    "gate recomputed": ("gate recomputed",),
}

# The Pallas kernel's streaming options each kernel change sets; variants making one are rows of
# the "pallas" method only.
KERNEL_CHANGES = {
    "loads after stores": {"loads_ahead": False},
    "chained kernel": {"chain_in_kernel": True},
    "mosaic_gpu kernel": {"backend": "mosaic_gpu"},
}
KERNEL_VARIANTS = frozenset(
    name
    for name, changes in VARIANTS.items()
    if set(changes) & set(KERNEL_CHANGES) and name != TIMED_ON_H200
)


def _norm_scale_last(self, x, *, mask=None):
    """``nnx.LayerNorm`` with the scale applied after normalising, ``(x - mean) * rsqrt(var +
    eps) * scale + bias``: Flax multiplies ``rsqrt(var + eps) * scale`` first, a full-size
    product whose broadcasts the gradient step materialises (seen in the compiled HLO)."""
    del mask
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(variance + self.epsilon) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype or x.dtype)


def _gate_recomputed_output(self, h, x, gate=None):
    """``_HGRUBase.output`` with ``norm(feats) * silu(gate)`` under ``jax.checkpoint``: the
    backward pass recomputes the gate's sigmoid instead of keeping it and the product."""
    feats = jnp.concatenate([h.real, h.imag], axis=-1) if self.complex_valued else h
    feats = feats.astype(self.dtype or x.dtype)
    gate = self.gate(x) if gate is None else gate
    if self.norm_before_gate:
        gated = jax.checkpoint(lambda f, g: self.norm(f) * nnx.silu(g))
    else:
        gated = jax.checkpoint(lambda f, g: self.norm(f * nnx.silu(g)))
    return self.out_proj(gated(feats, gate))


def _transposed_scan(self, a, b, direction, axis=-2, h0=None, return_last_state=False):
    """The HGRU's scan as it was: the time axis moved next to the channels and back."""
    out = linear_recurrence(
        jnp.moveaxis(a, axis, -2),
        jnp.moveaxis(b, axis, -2),
        h0,
        reverse=direction == "reverse",
        method=self.method,
        return_last_state=return_last_state,
    )
    if return_last_state:
        return jnp.moveaxis(out[0], -2, axis), out[1]
    return jnp.moveaxis(out, -2, axis)


def _decay_per_direction(self, lam, direction):
    """``_HGRUBase.decay`` as it was: the sine and cosine of that direction's theta alone."""
    if not self.complex_valued:
        return lam
    theta = self.theta if direction == "forward" or self.num_phases == 1 else self.theta_reverse
    theta = theta[...].astype(lam.dtype)
    return jax.lax.complex(lam * jnp.cos(theta), lam * jnp.sin(theta))


# The changes made by setting one attribute while a step is traced: (object, attribute, value).
PATCHES = {
    "autodiff batch norm": (norms_module, "CLOSED_FORM_BATCH_NORM_GRADIENT", False),
    "directions in one scan": (hgru_module, "MERGE_DIRECTIONS", True),
    "directions in two scans": (hgru_module, "MERGE_DIRECTIONS", False),
    "fused projections": (hgru_module, "FUSE_PROJECTIONS", True),
    "separate projections": (hgru_module, "FUSE_PROJECTIONS", False),
    "norm scale last": (nnx.LayerNorm, "__call__", _norm_scale_last),
    "gate recomputed": (hgru_module._HGRUBase, "output", _gate_recomputed_output),
    "axis-aware scans": (hgru_module._HGRUBase, "scan", _transposed_scan),
    "phases per direction": (hgru_module._HGRUBase, "decay", _decay_per_direction),
}


@contextlib.contextmanager
def undone(changes: tuple[str, ...]):
    """While tracing inside this context, the HGRU runs with ``changes`` undone (see
    ``VARIANTS``): "fused projections" / "separate projections" force the input projections
    into one / three matmuls; "norm scale last" and "gate recomputed" force two changes that
    were tried and not adopted; "directions in one scan" / "directions in two scans" set
    ``hgru.MERGE_DIRECTIONS`` to True / False; "autodiff batch norm" sets
    ``norms.CLOSED_FORM_BATCH_NORM_GRADIENT`` to False; "phases per direction" computes each
    scan direction's ``exp(i theta)`` on its own;
    "chained kernel" turns on the Pallas kernel's ``chain_in_kernel``, "loads after stores"
    turns its ``loads_ahead`` off and "mosaic_gpu kernel" runs it on Mosaic GPU."""
    kernel_options = {k: v for c in changes for k, v in KERNEL_CHANGES.get(c, {}).items()}
    scan_context = (
        ablated("sequential[zero buffers, unroll 8]")
        if "scan buffers and unroll" in changes
        else ablated("sequential[fresh buffers, unroll 2]")
        if "in-place scans" in changes
        else contextlib.nullcontext()
    )
    with contextlib.ExitStack() as stack:
        for change in changes:
            if change in PATCHES:
                stack.enter_context(mock.patch.object(*PATCHES[change]))
        stack.enter_context(scan_context)
        stack.enter_context(streaming_options(**kernel_options))
        yield


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


def random_tokens(batch: int, length: int, vocab_size: int) -> jax.Array:
    """The ids of one training step, (batch, length + 1) (the losses read a sequence of
    ``length`` and its targets or label from them), the same for every row at a length."""
    return jax.random.randint(jax.random.key(length), (batch, length + 1), 0, vocab_size)


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
    if getattr(args, "scan", "1d") == "2d":
        side = math.isqrt(args.length)
        config = dataclasses.replace(config, mixer=MixerConfig(scan="2d"), grid_shape=(side, side))
    models = {
        f"hgrn[{m}]": (
            lambda m=m: HGRNClassifier(with_method(config, m), dtype=dtype, rngs=nnx.Rngs(0))
        )
        for m in args.methods
    }
    models["transformer"] = lambda: TransformerClassifier(config, dtype=dtype, rngs=nnx.Rngs(0))
    return models, sizes, classification_loss, config.vocab_size


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests/test_gpu_session.py, which checks
    benchmarks/gpu_session.sh's flags against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="lm", choices=["lm", "lra"])
    parser.add_argument(
        "--scan", default="1d", choices=["1d", "2d"], help="the LRA classifier's mixer"
    )
    parser.add_argument("--full", action="store_true", help="the paper's model size")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--batch", type=int, help="default 1 (lm) or 8 (lra)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=["auto", *METHODS],
        default=["auto"],
        help="recurrence methods: one HGRN row each",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["after"],
        help="HGRN rows with speed changes undone (VARIANTS), timed in the same rounds",
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the JSON file name, e.g. '_tried' (keeps others)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="time each row in child processes of its own, this many alternating rounds "
        "(default 0: every row in this process, interleaved)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    batch = args.batch or (1 if args.task == "lm" else 8)
    lengths = args.lengths or (FULL_LENGTHS if args.full else SMALL_LENGTHS)
    if args.scan == "2d":
        if args.task != "lra":
            parser.error("--scan 2d is the LRA classifier's 2-D mixer: add --task lra")
        not_square = [n for n in lengths if math.isqrt(n) ** 2 != n]
        if not_square:
            parser.error(f"--scan 2d needs square lengths (a sqrt(L) grid); got {not_square}")
    dtype = None if args.dtype == "float32" else jnp.bfloat16
    name = (
        "train_throughput"
        + ("_full" if args.full else "")
        + ("_lra" if args.task == "lra" else "")
        + ("_2d" if args.scan == "2d" else "")
        + ("_variants" if args.variants != ["after"] else "")
        + args.tag
    )
    meta = {
        "task": args.task,
        "scan": args.scan,
        "batch": batch,
        "dtype": args.dtype,
        "parameters": {},
        "attention": "jax.nn.dot_product_attention, head size "
        f"{HEAD_DIM}, {'causal' if args.task == 'lm' else 'non-causal'}",
        "step": "loss + grad + AdamW update, jitted",
        "timing": f"fastest of {args.reps} interleaved rounds (every model once per round); "
        "median_ms also given",
        "variants": {v: list(VARIANTS[v]) for v in args.variants},
    }
    if args.processes:
        meta["timing"] = (
            f"fastest of {args.processes} rounds x {args.reps} calls, each row in its own "
            "child process per round, the rows' processes alternating; median_ms also given"
        )
    if args.child:
        length = lengths[0]
        times, peaks = measure(args, dtype, batch, length, meta, only=args.child)
        print(json.dumps({"times": times, "peaks": peaks, "parameters": meta["parameters"]}))
        return
    rows: list[dict] = []
    for length in lengths:
        if args.processes:
            times, peaks = measure_in_processes(args, length, meta)
        else:
            times, peaks = measure(args, dtype, batch, length, meta)
        variants = {row: (model, variant) for row, model, variant in row_names(args)}
        for row_name, row_times in times.items():
            seconds = min(row_times)
            rows.append(
                {
                    "model": row_name,
                    "length": length,
                    "step_ms": seconds * 1e3,
                    "median_ms": statistics.median(row_times) * 1e3,
                    "tokens_per_s": batch * length / seconds,
                    "peak_MiB": peaks[row_name] / 2**20,
                    "spread": max(row_times) / seconds,
                    "step_ops": sum(
                        meta.get("step_ops", {}).get(f"{row_name} L={length}", {}).values()
                    )
                    or None,
                    "configuration": configuration(args.task, *variants[row_name], length),
                }
            )
        add_speedups(rows)
        print(
            format_table([r for r in rows if r["length"] == length], TABLE_COLUMNS),
            flush=True,
        )
        write_results(name, rows, meta)
    print(format_table(rows, TABLE_COLUMNS))
    print("wrote", write_results(name, rows, meta))


# The variants that only set how a bidirectional HGRU scans its two directions, and the value.
MERGE_VARIANTS = {"directions in one scan": True, "directions in two scans": False}
# The changes a row's ``configuration`` records.
CONFIGURED_CHANGES = (
    frozenset(MERGE_VARIANTS)
    | frozenset(KERNEL_CHANGES)
    | {"autodiff batch norm", "phases per direction"}
)


def method_of(model: str) -> str:
    """The recurrence method of an HGRN row's model name, ``"hgrn[<method>]"``."""
    return model.removeprefix("hgrn[").removesuffix("]")


def configuration(task: str, model: str, variant: str, length: int) -> dict:
    """What a row's HGRN step runs with beyond its model and length, so that a row is not
    matched with one timed before a default changed: the recurrence method ``auto`` resolves
    to (on this backend), how the complex decay's phases are computed, whether the
    bidirectional mixer merges its directions and how BatchNorm's gradient is computed (LRA
    only) and, for the Pallas kernel, its back-end (Triton or Mosaic GPU) and streaming options.
    ``{}`` for the Transformer."""
    if model == "transformer":
        return {}
    method = method_of(model)
    with undone(VARIANTS[variant]), streaming_options() as options:
        resolved = default_method(length) if method == "auto" else method
        config: dict = {"method": resolved}
        per_direction = hgru_module._HGRUBase.decay is _decay_per_direction
        config["phases"] = "per direction" if per_direction else "shared"
        if task == "lra":
            config["directions_merged"] = hgru_module.merge_directions(method, length)
            config["batch_norm_gradient"] = (
                "closed form" if norms_module.CLOSED_FORM_BATCH_NORM_GRADIENT else "autodiff"
            )
        if resolved == "pallas":
            # The back-end too: a Mosaic GPU row must not be matched with a Triton one
            # (gpu_compile.add_measured; rows timed before it was recorded ran Triton). A JAX
            # without Pallas's Triton back-end runs the Triton options on Mosaic GPU.
            triton = options.backend == "triton" and pallas_recurrence._triton_available()
            config["backend"] = "triton" if triton else "mosaic_gpu"
            config["loads_ahead"] = options.loads_ahead
            config["chain_in_kernel"] = options.chain_in_kernel
    return config


def row_names(args) -> list[tuple[str, str, str]]:
    """``(row name, model name, variant)`` of every row, in order. Kernel variants are rows of
    the ``pallas`` method only; a merge variant is left out where it is the default already
    (``hgru.merge_directions`` at ``args.length``, when it is set, on this backend)."""
    models = [f"hgrn[{m}]" for m in args.methods] + ["transformer"]

    def is_default(model: str, variant: str) -> bool:
        if variant not in MERGE_VARIANTS or getattr(args, "length", None) is None:
            return False
        merged = hgru_module.merge_directions(method_of(model), args.length)
        return merged == MERGE_VARIANTS[variant]

    return [
        (model if variant == "after" else f"{model} ({variant})", model, variant)
        for model in models
        for variant in (args.variants if model != "transformer" else ["after"])
        if (variant not in KERNEL_VARIANTS or model == "hgrn[pallas]")
        and not is_default(model, variant)
    ]


def measure(args, dtype, batch: int, length: int, meta: dict, only: str | None = None):
    """``({row name: step seconds of each round}, {row name: peak bytes})`` of every row (or of
    row ``only``), compiled first and then timed in interleaved rounds in this process."""
    args.length = length
    models, sizes, loss, vocab_size = builders(args, dtype)
    meta["config"] = sizes
    ids = random_tokens(batch, length, vocab_size)
    calls = {}
    for row_name, model_name, variant in row_names(args):
        if only is not None and row_name != only:
            continue
        model = models[model_name]()
        meta["parameters"][model_name] = parameter_count(model)
        step, state = train_step_fn(model, loss)
        try:
            with undone(VARIANTS[variant]):
                executable = step.lower(*state, ids).compile()
        except Exception as error:  # e.g. out of memory: report it and go on
            print(
                f"{row_name} L={length}: FAILED {type(error).__name__}: {str(error)[:1000]}",
                file=sys.stderr,
                flush=True,
            )
            continue
        calls[row_name] = (executable, (*state, ids))
    times = interleaved_times(calls, args.reps)
    peaks = {}
    for row_name in times:
        memory = calls[row_name][0].memory_analysis()
        peaks[row_name] = (
            memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        )
        meta.setdefault("step_ops", {})[f"{row_name} L={length}"] = step_op_counts(
            calls[row_name][0]
        )
    return times, peaks


def measure_in_processes(args, length: int, meta: dict):
    """:func:`measure`, each row in a child process of its own, ``args.processes`` rounds with
    the rows' processes alternating. Rows interleaved in one process share its heap, and a
    row's step can depend on what the rows before it left there; here each process starts from
    the same state."""
    args.length = length
    flags = [f"--task={args.task}", f"--scan={args.scan}", f"--dtype={args.dtype}"]
    flags += [f"--lengths={length}", f"--reps={args.reps}", "--methods", *args.methods]
    flags += ["--variants", *args.variants] + (["--full"] if args.full else [])
    flags += [f"--batch={args.batch}"] if args.batch else []
    times: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    for round_index in range(args.processes):
        for row_name, _, _ in row_names(args):
            command = [sys.executable, __file__, *flags, f"--child={row_name}"]
            result, stderr = run_child(command, f"the child process for {row_name!r}")
            if row_name not in result["times"]:
                print(f"{row_name} L={length}: {stderr.strip()[-1000:]}", flush=True)
                continue
            times.setdefault(row_name, []).extend(result["times"][row_name])
            peaks[row_name] = result["peaks"][row_name]
            meta["parameters"].update(result["parameters"])
        print(f"L={length}: round {round_index + 1}/{args.processes} done", flush=True)
    return times, peaks


def interleaved_times(calls: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of ``reps`` rounds, every call once per round (in an order rotated by one each
    round) after one warm-up call each; a call that fails (e.g. out of memory) is reported and
    left out."""
    times: dict[str, list[float]] = {}
    for row_name, (executable, call_args) in calls.items():
        try:
            jax.block_until_ready(executable(*call_args))
            times[row_name] = []
        except Exception as error:
            print(f"{row_name}: FAILED {type(error).__name__}: {str(error)[:1000]}", flush=True)
    names = list(times)
    for round_index in range(reps):
        # Each round starts at the next model: the call after the Transformer's large step
        # may pay for its memory traffic, so no model always takes that place.
        shift = round_index % max(1, len(names))
        for row_name in names[shift:] + names[:shift]:
            executable, call_args = calls[row_name]
            start = time.perf_counter()
            jax.block_until_ready(executable(*call_args))
            times[row_name].append(time.perf_counter() - start)
    return times


def add_speedups(rows: list[dict]) -> None:
    """``x_transformer``: each row's tokens/s over the Transformer's at the same length;
    ``x_before``: over the same HGRN model's ``(before)`` row (all speed changes undone)."""
    for row in rows:
        same_length = [r for r in rows if r["length"] == row["length"]]
        other = next((r for r in same_length if r["model"] == "transformer"), None)
        row["x_transformer"] = row["tokens_per_s"] / other["tokens_per_s"] if other else None
        base = row["model"].split(" (")[0]
        before = next((r for r in same_length if r["model"] == f"{base} (before)"), None)
        row["x_before"] = (
            row["tokens_per_s"] / before["tokens_per_s"]
            if before and row["model"] != "transformer"
            else None
        )


if __name__ == "__main__":
    main()
