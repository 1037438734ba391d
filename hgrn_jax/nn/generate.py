"""Autoregressive generation from :class:`~hgrn_jax.nn.HGRNLM` with its recurrent cache.

The prompt is consumed in one ``lm.step`` (prefill); every new token is one more ``lm.step`` on a
(B, 1) input inside a ``lax.scan``, so the whole generation is one compiled program and each token
costs the same whatever the context length.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.nn.checks import check_token_ids


def check_top_k(top_k: int | None, vocab_size: int | None) -> None:
    """Raise ValueError unless ``top_k`` is None or in ``[1, vocab_size]`` (``vocab_size`` None:
    unknown, only the lower end is checked)."""
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be an integer or None; got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(
            f"top_k={top_k} exceeds the vocabulary size {vocab_size}; pass top_k <= "
            f"{vocab_size}, or None to sample from the whole vocabulary"
        )


def sample_token(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float,
    top_k: int | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Next token ids (B,) from logits (B, vocab).

    ``greedy``: the argmax. Otherwise a draw from ``softmax(logits / temperature)`` restricted to
    the ``top_k`` largest logits when ``top_k`` is given (``top_k=1`` is the argmax; more than
    ``vocab`` is a ValueError). The logits are shifted by their maximum before the division (the
    softmax is unchanged), so a tiny temperature gives the argmax: unshifted, ``logits /
    temperature`` overflows to -inf for every negative logit and the draw was token 0.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k is not None:
        check_top_k(top_k, logits.shape[-1])
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_rng(rng: jax.Array) -> None:
    """Raise ValueError unless ``rng`` is one JAX key: ``jax.random.key(seed)`` (a typed key of
    shape ()) or a raw ``jax.random.PRNGKey(seed)`` (uint32 key data of shape (n,))."""
    dtype, shape = getattr(rng, "dtype", None), tuple(np.shape(rng))
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == np.uint32 and len(shape) == 1
    if not ((typed and shape == ()) or raw):
        what = f"key array of shape {shape}" if typed else f"{type(rng).__name__} {rng!r}"[:80]
        raise ValueError(
            f"rng must be one JAX key, e.g. rng=jax.random.key(seed); got {what} (one key "
            "draws the tokens of every batch row)"
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy"))
def _generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    *,
    max_new_tokens: int,
    top_k: int | None,
    greedy: bool,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()  # a copy: the caller's model keeps its mode
    logits, cache = model.step(prompt_ids, model.init_cache(prompt_ids.shape[0]))
    keys = jax.random.split(rng, max_new_tokens)
    first = sample_token(logits[:, -1], keys[0], temperature, top_k, greedy)

    def decode(carry, key):
        token, cache = carry
        logits, cache = model.step(token[:, None], cache)
        token = sample_token(logits[:, 0], key, temperature, top_k, greedy)
        return (token, cache), token

    _, rest = jax.lax.scan(decode, (first, cache), keys[1:])
    new = jnp.concatenate([first[:, None], rest.T], axis=1)
    return jnp.concatenate([prompt_ids.astype(jnp.int32), new], axis=1)


def generate(
    model: nnx.Module,
    prompt_ids: jax.Array,
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Continue ``prompt_ids`` (B, T) by ``max_new_tokens`` tokens; returns (B, T + new) int32.

    ``model`` is an :class:`~hgrn_jax.nn.HGRNLM` (anything with ``init_cache(B)`` and
    ``step(ids, cache) -> (logits, cache)``); it runs in eval mode (no dropout). ``greedy=True``
    takes the argmax; otherwise tokens are drawn with ``temperature`` (> 0 in float32; a tiny one
    gives the argmax) and ``top_k`` using the one JAX key ``rng`` (``jax.random.key(seed)``; the
    same key gives the same tokens, and with JAX's default partitionable threefry keys a longer
    generation extends a shorter one). ``prompt_ids`` may be a NumPy array or nested lists of
    integer ids. Compiled once per model structure, prompt shape and ``max_new_tokens``.
    """
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(
            f"prompt_ids must be (batch, length >= 1) token ids; got shape "
            f"{prompt_ids.shape} (start an empty prompt with a BOS token)"
        )
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size:
        check_token_ids(prompt_ids, int(vocab_size), "prompt_ids")
    # A Python int for the jit's static argument: NumPy and 0-d JAX integers (unhashable) too,
    # and whole floats such as 3.0, which jax.random.split took.
    if isinstance(max_new_tokens, float) and max_new_tokens.is_integer():
        max_new_tokens = int(max_new_tokens)
    try:
        max_new_tokens = operator.index(max_new_tokens)
    except TypeError:
        raise ValueError(
            f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}"
        ) from None
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if max_new_tokens == 0:
        return prompt_ids.astype(jnp.int32)
    if not greedy:
        if rng is None:
            raise ValueError("sampling needs rng=jax.random.key(seed) (or pass greedy=True)")
        check_rng(rng)
        if not np.float32(temperature) > 0:  # what _generate divides by
            raise ValueError(
                f"temperature must be > 0 (in float32); got {temperature} (use greedy=True for "
                "argmax decoding)"
            )
    check_top_k(top_k, int(vocab_size) if vocab_size else None)  # the logits recheck it
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_ids,
        rng,
        jnp.float32(temperature),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        greedy=greedy,
    )
