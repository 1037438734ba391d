"""Time per generated token vs context length: HGRN LM (recurrent state) vs a causal Transformer
(KV cache).

For each context length: prefill the context (untimed compile, one timed run), then decode
``--steps`` tokens greedily inside one jitted ``lax.scan`` and report the time per token (median
and min over ``--reps`` runs; all configurations are timed round-robin, so a shared machine's
background load hits them alike). Batch 1. The HGRN LM keeps one (B, d) state per layer, so its cost per token should
not depend on the context; the Transformer attends over a preallocated KV cache of length
context + steps, so its cost grows with the context. Both models have the same width, depth,
GLU and tied vocabulary; the Transformer has no position encoding (it does not change the cost).

    python benchmarks/generate.py                      # d 512 x 6, vocab 50264, contexts 128/1k/8k
    python benchmarks/generate.py --contexts 64,256 --features 64 --layers 2 --vocab 1000 --no-write
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import format_table, write_results
from hgrn_jax.nn import GLU, HGRNLM, LMConfig
from hgrn_jax.nn.initializers import dense


def attention_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Scaled scores (B, H, T, S) of head-major q (B, H, T, Dh) against k (B, H, S, Dh).

    Head-major, because XLA:CPU contracts a (B, S, H, Dh) cache ~50x slower (measured at S = 8k),
    which is also the layout ``jax.nn.dot_product_attention`` takes.
    """
    return jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention, head-major; mask (T, S) True where a query may attend."""
    scores = jnp.where(mask, attention_scores(q, k), -jnp.inf)
    return jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(scores, axis=-1), v)


class TransformerLayer(nnx.Module):
    """Pre-norm causal self-attention + GLU, with a two-segment KV cache.

    The cache of a layer holds the prefilled context (``k_ctx``, ``v_ctx``: (B, H, C, Dh),
    written once by the prefill) and the decoded tokens (``k_new``, ``v_new``: (B, H, N, Dh),
    one slot per step). A decode step attends over both: its cost grows with C + N. The split
    avoids an XLA:CPU artefact: updating one slot of a large loop-carried buffer inside a
    ``lax.scan`` copies the whole buffer every step (~50 ms per step at 8k here), which would
    charge the Transformer for a copy that a real KV cache does not make.
    """

    def __init__(self, d: int, heads: int, glu_hidden: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1, self.norm2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.qkv = dense(d, 3 * d, ("embed", "mlp"), rngs=rngs)
        self.out = dense(d, d, ("mlp", "embed"), rngs=rngs)
        self.mlp = GLU(d, glu_hidden, act="none", rngs=rngs)

    def prefill(self, x: jax.Array, cache: dict, kv_chunk: int) -> tuple[jax.Array, dict]:
        """The context x (B, C, d) from position 0; query chunks attend to keys up to their end."""
        q, k, v = self._qkv(x)
        outs = []
        for lo in range(0, x.shape[1], kv_chunk):
            hi = min(lo + kv_chunk, x.shape[1])
            causal = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]
            outs.append(attention(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], causal))
        return self._finish(x, jnp.concatenate(outs, axis=2)), dict(cache, k_ctx=k, v_ctx=v)

    def decode(self, x: jax.Array, cache: dict, n_new: jax.Array) -> tuple[jax.Array, dict]:
        """One token x (B, 1, d) after the context and ``n_new`` decoded tokens."""
        q, k, v = self._qkv(x)
        k_new = jax.lax.dynamic_update_slice(cache["k_new"], k, (0, 0, n_new, 0))
        v_new = jax.lax.dynamic_update_slice(cache["v_new"], v, (0, 0, n_new, 0))
        filled = jnp.arange(k_new.shape[2]) <= n_new
        scores = jnp.concatenate(
            [
                attention_scores(q, cache["k_ctx"]),
                jnp.where(filled, attention_scores(q, k_new), -jnp.inf),
            ],
            -1,
        )
        p = jax.nn.softmax(scores, axis=-1)
        c = cache["k_ctx"].shape[2]
        y = jnp.einsum("bhts,bhsd->bhtd", p[..., :c], cache["v_ctx"]) + jnp.einsum(
            "bhts,bhsd->bhtd", p[..., c:], v_new
        )
        return self._finish(x, y), dict(cache, k_new=k_new, v_new=v_new)

    def _qkv(self, x: jax.Array) -> list[jax.Array]:
        b, t, _ = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3 * self.heads, -1).transpose(0, 2, 1, 3)
        return jnp.split(qkv, 3, axis=1)

    def _finish(self, x: jax.Array, y: jax.Array) -> jax.Array:
        b, t, d = x.shape
        x = x + self.out(y.transpose(0, 2, 1, 3).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TransformerLM(nnx.Module):
    """A minimal causal Transformer LM (tied embedding) with a preallocated KV cache.

    ``step(ids, cache, kv_chunk=...)`` prefills a context of exactly the cache's context length;
    ``step(ids, cache)`` decodes one token.
    """

    def __init__(
        self, vocab: int, d: int, layers: int, heads: int, glu_hidden: int, *, rngs: nnx.Rngs
    ):
        self.d, self.heads = d, heads
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.layers = nnx.List(
            [TransformerLayer(d, heads, glu_hidden, rngs=rngs) for _ in range(layers)]
        )
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)

    def init_cache(self, batch: int, context: int, new_tokens: int):
        def zeros(length):
            return jnp.zeros((batch, self.heads, length, self.d // self.heads))

        layer = dict(
            k_ctx=zeros(context),
            v_ctx=zeros(context),
            k_new=zeros(new_tokens),
            v_new=zeros(new_tokens),
        )
        return tuple(dict(layer) for _ in self.layers), jnp.int32(0)

    def step(self, ids: jax.Array, cache, kv_chunk: int | None = None):
        layer_caches, n_new = cache
        x = self.embed(ids)
        new = []
        for layer, layer_cache in zip(self.layers, layer_caches):
            if kv_chunk is None:
                x, layer_cache = layer.decode(x, layer_cache, n_new)
            else:
                x, layer_cache = layer.prefill(x, layer_cache, kv_chunk)
            new.append(layer_cache)
        n_new = n_new + (1 if kv_chunk is None else 0)
        return self.embed.attend(self.final_norm(x)), (tuple(new), n_new)


def _decode_fn(steps: int):
    """jit(state, cache, token) -> tokens: ``steps`` greedy decode steps in one lax.scan."""

    @jax.jit
    def decode(graphdef, state, cache, token):
        model = nnx.merge(graphdef, state)

        def body(carry, _):
            token, cache = carry
            logits, cache = model.step(token[:, None], cache)
            token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
            return (token, cache), token

        return jax.lax.scan(body, (token, cache), None, length=steps)[1]

    return decode


def _cache_bytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def prepare(
    name: str, model: nnx.Module, context: int, steps: int, init_cache, prefill_kwargs: dict
) -> tuple[dict, Callable[[], jax.Array]]:
    """Prefill a random context (compiled first, then one timed run) and compile the decode.

    Returns the row so far and a function that decodes ``steps`` tokens from that state.
    """
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(context), (1, context), 0, 1000)

    @jax.jit
    def prefill(state, ids, cache):
        # The context's logits but the last are unused, so XLA drops their vocabulary matmul.
        model = nnx.merge(graphdef, state)
        _, cache = model.step(ids[:, :-1], cache, **prefill_kwargs)
        return model.step(ids[:, -1:], cache)

    cache0 = init_cache()
    compiled = prefill.lower(state, ids, cache0).compile()
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(compiled(state, ids, cache0))
    prefill_s = time.perf_counter() - start
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    decode = _decode_fn(steps)
    run = functools.partial(decode, graphdef, state, cache, token)
    jax.block_until_ready(run())  # compile
    row = {
        "model": name,
        "context": context,
        "prefill_s": prefill_s,
        "cache_MiB": _cache_bytes(cache) / 2**20,
    }
    return row, run


def time_round_robin(runs: list[Callable[[], jax.Array]], reps: int) -> list[list[float]]:
    """Seconds of each run, ``reps`` times, interleaved so that every configuration sees the
    same background load (the machine may be shared)."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[i].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="128,1024,8192")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--glu-hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50264)
    parser.add_argument("--kv-chunk", type=int, default=1024, help="Transformer prefill chunk")
    parser.add_argument(
        "--name", default="generate", help="results file benchmarks/results/<name>_<platform>.json"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]

    hgrn = HGRNLM(
        LMConfig(
            vocab_size=args.vocab,
            features=args.features,
            num_layers=args.layers,
            glu_expand=args.glu_hidden / args.features,
        ),
        rngs=nnx.Rngs(0),
    )
    transformer = TransformerLM(
        args.vocab, args.features, args.layers, args.heads, args.glu_hidden, rngs=nnx.Rngs(0)
    )
    params = {
        name: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
        for name, m in (("hgrn", hgrn), ("transformer", transformer))
    }
    rows, runs = [], []
    for context in contexts:
        for name, model, init_cache, kwargs in (
            ("hgrn", hgrn, lambda: hgrn.init_cache(1), {}),
            (
                "transformer",
                transformer,
                lambda: transformer.init_cache(1, context - 1, args.steps + 1),
                {"kv_chunk": args.kv_chunk},
            ),
        ):
            row, run = prepare(name, model, context, args.steps, init_cache, kwargs)
            rows.append(row)
            runs.append(run)
            print(f"prepared {name} at context {context}", flush=True)
    for row, seconds in zip(rows, time_round_robin(runs, args.reps)):
        row["ms_per_token"] = 1e3 * statistics.median(seconds) / args.steps
        row["ms_per_token_min"] = 1e3 * min(seconds) / args.steps
    columns = ["model", "context", "ms_per_token", "ms_per_token_min", "prefill_s", "cache_MiB"]
    print(format_table(rows, columns))
    if not args.no_write:
        meta = dict(
            vars(args),
            parameters=params,
            batch=1,
            note="ms_per_token: median (and min) over reps of (time of --steps greedy "
            "decode steps in one jitted lax.scan) / steps, all configurations "
            "timed round-robin; prefill_s: one run after compilation",
        )
        print("wrote", write_results(args.name, rows, meta))


if __name__ == "__main__":
    main()
