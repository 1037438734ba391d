"""Autoregressive generation from :class:`~hgrn_jax.nn.HGRNLM` with its recurrent cache.

The prompt is consumed in one ``lm.step`` (prefill); every new token is one more ``lm.step`` on a
(B, 1) input inside a ``lax.scan``, so the whole generation is one compiled program and each token
costs the same whatever the context length.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.nn.checks import check_flags, check_token_ids


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


def check_top_p(top_p: float | None) -> None:
    """Raise ValueError unless ``top_p`` is None or a real number in ``(0, 1]``."""
    if top_p is None:
        return
    number = isinstance(top_p, (int, float, np.integer, np.floating)) or (
        isinstance(top_p, (np.ndarray, jax.Array))
        and not isinstance(top_p, jax.core.Tracer)
        and top_p.ndim == 0
        and (jnp.issubdtype(top_p.dtype, jnp.integer) or jnp.issubdtype(top_p.dtype, jnp.floating))
    )
    if isinstance(top_p, (bool, np.bool_)) or not number:
        raise ValueError(
            f"top_p must be a number in (0, 1] or None; got {top_p!r} (e.g. top_p=0.9 keeps the "
            "most probable tokens holding 90% of the probability)"
        )
    if not 0.0 < float(top_p) <= 1.0:  # NaN fails too
        raise ValueError(
            f"top_p must be in (0, 1] or None; got {float(top_p)} (1 keeps every token, None "
            "turns nucleus sampling off)"
        )


def options_greedy_ignores(
    temperature: jax.Array | float, top_k: int | None, top_p: jax.Array | float | None
) -> list[tuple[str, object]]:
    """``(name, value)`` of each sampling option that greedy decoding would ignore:
    ``temperature`` other than 1.0 (a traced one counts), ``top_k`` or ``top_p`` other than
    None. The one rule of :func:`generate` and of ``experiments.generate``'s flags."""
    try:
        default_temperature = bool(np.float32(temperature) == 1.0)
    except TypeError:  # a traced temperature: a value, which greedy decoding would ignore
        default_temperature = False
    given = [] if default_temperature else [("temperature", temperature)]
    return given + [(n, v) for n, v in (("top_k", top_k), ("top_p", top_p)) if v is not None]


def check_greedy_options(
    temperature: jax.Array | float, top_k: int | None, top_p: jax.Array | float | None
) -> None:
    """Raise ValueError naming the sampling options that greedy decoding would ignore
    (:func:`options_greedy_ignores`)."""
    given = [
        f"{name}={value!r}" for name, value in options_greedy_ignores(temperature, top_k, top_p)
    ]
    if given:
        raise ValueError(
            f"greedy=True takes the argmax and would ignore {', '.join(given)}; leave "
            f"{'them' if len(given) > 1 else 'it'} out, or pass greedy=False to sample with "
            f"{'them' if len(given) > 1 else 'it'}"
        )


def _nucleus(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """``logits`` (B, vocab) with every token outside the nucleus set to -inf: the most probable
    tokens whose probabilities sum to at least ``top_p``, the first token always kept, ties with
    the least probable kept token kept too. ``top_p >= 1`` keeps every token (a float32 sum of
    all the probabilities may fall short of 1)."""
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    total = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(total[..., :1]), total[..., :-1]], axis=-1)
    keep = (before < top_p) | (top_p >= 1.0)
    kept = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_token(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float,
    top_k: int | None = None,
    greedy: bool = False,
    top_p: jax.Array | float | None = None,
) -> jax.Array:
    """Next token ids (B,) from logits (B, vocab).

    ``greedy``: the argmax. Otherwise a draw from ``softmax(logits / temperature)`` restricted to
    the ``top_k`` largest logits when ``top_k`` is given (``top_k=1`` is the argmax; more than
    ``vocab`` is a ValueError), then, when ``top_p`` is given (in ``(0, 1]``; may be a traced
    float), to the nucleus: the fewest most probable tokens whose probabilities (after the
    temperature and ``top_k``) sum to at least ``top_p``, the most probable always among them.
    The logits are shifted by their maximum before the division (the softmax is unchanged), so a
    tiny temperature gives the argmax: unshifted, ``logits / temperature`` overflows to -inf for
    every negative logit and the draw was token 0.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k is not None:
        check_top_k(top_k, logits.shape[-1])
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        if not isinstance(top_p, jax.core.Tracer):
            check_top_p(top_p)
        logits = _nucleus(logits, jnp.asarray(top_p, jnp.float32))
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_prompt_mask(prompt_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``prompt_mask`` as a bool (B, T) array, after a ValueError naming the problem and the fix
    unless it has the prompt's ``shape``, holds only 0/1 (or bools) and left-pads every row: a
    run of 0s, then at least one 1 up to the last column. Values are checked only when
    concrete (not under a trace)."""
    mask = jnp.asarray(prompt_mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"prompt_mask must have prompt_ids' shape {tuple(shape)}; got shape {mask.shape} "
            "(pass one 0/1 per prompt token: 1 for a real token, 0 for padding)"
        )
    dtype = mask.dtype
    if not (
        dtype == jnp.bool_
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise ValueError(
            f"prompt_mask must be bool or 0/1 numbers; got dtype {dtype} (pass a bool array, "
            "True for real tokens)"
        )
    if isinstance(mask, jax.core.Tracer):
        return mask.astype(bool)
    values = np.asarray(mask)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise ValueError(
            f"prompt_mask must hold only 0/1 (or False/True); got the value {bad.flat[0].item()!r} "
            "(pass 1 for real tokens and 0 for padding)"
        )
    real = values.astype(bool)
    empty = np.flatnonzero(~real.any(axis=1))
    if empty.size:
        raise ValueError(
            f"prompt_mask row {empty[0]} has no real token; every prompt needs at least one "
            "(start an empty prompt with a BOS token)"
        )
    fix = (
        "left-pad the prompts: each row's padding first, then its real tokens up to the last column"
    )
    ends_padded = np.flatnonzero(~real[:, -1])
    if ends_padded.size:
        raise ValueError(
            f"prompt_mask row {ends_padded[0]} ends with padding (its last column is 0); {fix}"
        )
    gaps = np.argwhere(real[:, :-1] & ~real[:, 1:])  # a real token followed by padding
    if gaps.size:
        row, column = gaps[0]
        raise ValueError(
            f"prompt_mask row {row} has padding at position {column + 1} after a real token, "
            f"which is not left padding; {fix}"
        )
    return jnp.asarray(real)


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


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy", "nucleus")
)
def _generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array | None,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    max_new_tokens: int,
    top_k: int | None,
    greedy: bool,
    nucleus: bool,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()  # a copy: the caller's model keeps its mode
    cache = model.init_cache(prompt_ids.shape[0])
    if prompt_mask is None:
        logits, cache = model.step(prompt_ids, cache)
    else:
        logits, cache = model.step(prompt_ids, cache, mask=prompt_mask)
    keys = jax.random.split(rng, max_new_tokens)
    sample = functools.partial(
        sample_token,
        temperature=temperature,
        top_k=top_k,
        greedy=greedy,
        top_p=top_p if nucleus else None,
    )
    first = sample(logits[:, -1], keys[0])

    def decode(carry, key):
        token, cache = carry
        logits, cache = model.step(token[:, None], cache)
        token = sample(logits[:, 0], key)
        return (token, cache), token

    _, rest = jax.lax.scan(decode, (first, cache), keys[1:])
    new = jnp.concatenate([first[:, None], rest.T], axis=1)
    return jnp.concatenate([prompt_ids.astype(jnp.int32), new], axis=1)


def check_temperature(temperature: Any) -> None:
    """ValueError naming ``temperature`` unless it is one finite number > 0 in float32 (what
    sampling divides by; a string or a per-row array gave NumPy's errors, naming nothing)."""
    ok = not isinstance(temperature, (str, bytes, bool, np.bool_)) and np.ndim(temperature) == 0
    if ok:
        try:
            ok = bool(0 < np.float32(temperature) < np.inf)
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise ValueError(
            f"temperature must be a finite number > 0 (in float32); got {temperature!r} (use "
            "greedy=True for argmax decoding; an infinite one drew tokens uniformly)"
        )


def is_language_model(model: Any) -> bool:
    """Whether :func:`generate` can continue prompts of ``model``: it has ``init_cache(B)`` and
    ``step`` (an :class:`~hgrn_jax.nn.HGRNLM`)."""
    return hasattr(model, "init_cache") and hasattr(model, "step")


def generate(
    model: nnx.Module,
    prompt_ids: jax.Array,
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    prompt_mask: jax.Array | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Continue ``prompt_ids`` (B, T) by ``max_new_tokens`` tokens; returns (B, T + new) int32.

    ``model`` is an :class:`~hgrn_jax.nn.HGRNLM` (anything with ``init_cache(B)`` and
    ``step(ids, cache, mask=None) -> (logits, cache)``); it runs in eval mode (no dropout).
    ``greedy=True`` takes the argmax (with ``temperature``, ``top_k`` or ``top_p`` other than
    1.0, None and None, which it would ignore, a ValueError); otherwise tokens are
    drawn with ``temperature`` (> 0 in float32; a tiny one gives the argmax), ``top_k`` (the k
    most probable tokens) and ``top_p`` (nucleus sampling, in (0, 1]: the fewest most probable
    tokens holding at least that probability after the temperature and ``top_k``; None: off)
    using the one JAX key ``rng`` (``jax.random.key(seed)``; the same key gives the same tokens,
    and with JAX's default partitionable threefry keys a longer generation extends a shorter
    one). ``prompt_ids`` may be a NumPy array or nested lists of integer ids.

    Prompts of different lengths: left-pad them to one length T and pass ``prompt_mask`` (B, T),
    1 / True for real tokens and 0 / False for padding, each row's padding first (its last column
    must be real; any padding id in the vocabulary will do). Every row's logits are then those
    of its unpadded prompt alone (to float32 rounding), so greedy decoding gives each row its own
    tokens (a sampled row's draws also depend on the batch shape, as without a mask). The result
    keeps the prompt as given, padding included, followed by the new tokens.

    Compiled once per model structure, prompt shape, ``max_new_tokens``, ``top_k``, ``greedy``,
    whether there is a ``prompt_mask`` and whether ``top_p`` is on (not its value).
    """
    if not is_language_model(model):
        raise ValueError(
            f"generate continues prompts of a language model (an HGRNLM: init_cache and step); "
            f"got a {type(model).__name__}"
        )
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
    if prompt_mask is not None:
        prompt_mask = check_prompt_mask(prompt_mask, prompt_ids.shape)
    check_flags("generate", greedy=greedy)  # greedy="False" is truthy: it decoded greedily
    check_top_p(top_p)
    if greedy:
        check_greedy_options(temperature, top_k, top_p)
    else:  # checked for max_new_tokens=0 too, which needs no key
        if rng is None and max_new_tokens:
            raise ValueError("sampling needs rng=jax.random.key(seed) (or pass greedy=True)")
        if rng is not None:
            check_rng(rng)
        check_temperature(temperature)
    check_top_k(top_k, int(vocab_size) if vocab_size else None)  # the logits recheck it
    if max_new_tokens == 0:
        return prompt_ids.astype(jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        rng,
        jnp.float32(temperature),
        jnp.float32(1.0 if top_p is None else top_p),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        greedy=greedy,
        nucleus=top_p is not None and not greedy,
    )
