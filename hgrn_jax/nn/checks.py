"""Input checks of the models' entry points: token ids inside the vocabulary, non-empty sequences,
and the shapes of a token mixer's input and padding mask (:func:`check_layer_input`,
:func:`check_mask`; Python-level shape checks at trace time, no runtime cost).

Token ids. An embedding lookup of an id ``>= vocab_size`` returns NaN under JAX's default
out-of-bounds gather, and a negative id silently reads another row (``-1`` is the last one).
So the models check their ids:

- ids that are not integers (float ids from a tokenizer's array): :class:`ValueError` naming
  the argument and the cast, eager or traced (the dtype is known at trace time);
- in eager calls (concrete arrays) always: :class:`ValueError` naming the bad id and vocab_size;
- under ``jax.jit`` (traced arrays) the values are unknown at trace time, so nothing is checked
  and an out-of-range id gives NaN (or a wrong row for negative ids) unless the checked mode is
  on: inside ``with checked_token_ids():`` the models add a ``jax.experimental.checkify`` check,
  and the function must be checkified, e.g.::

      from jax.experimental import checkify
      with checked_token_ids():
          err, logits = jax.jit(checkify.checkify(forward))(state, ids)
      err.throw()   # raises naming the bad id and vocab_size

The training runner checks every split's ids against ``config.model.vocab_size`` before its
first step (``hgrn_jax.training.preflight``), so jitted training never sees such ids.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_CHECKED = contextvars.ContextVar("hgrn_checked_token_ids", default=False)


@contextlib.contextmanager
def checked_token_ids(enabled: bool = True) -> Iterator[None]:
    """Models traced inside this context check their token ids with ``checkify.check``."""
    token = _CHECKED.set(enabled)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def check_token_ids(ids: jax.Array, vocab_size: int, name: str = "ids") -> None:
    """Raise ValueError (eager) or add a checkify check (traced, checked mode) when an id of
    ``ids`` leaves ``[0, vocab_size)``; ValueError (eager or traced) for ids that are not
    integers."""
    dtype = jnp.result_type(ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"{name}: token ids must be integers; got dtype {dtype} (cast them with "
            ".astype(jnp.int32))"
        )
    if isinstance(ids, jax.core.Tracer):
        if _CHECKED.get():
            from jax.experimental import checkify

            high, low = jnp.max(ids), jnp.min(ids)
            checkify.check(
                (low >= 0) & (high < vocab_size),
                f"{name}: token id {{bad}} is outside [0, {vocab_size}) (vocab_size={vocab_size})",
                bad=jnp.where(high >= vocab_size, high, low),
            )
        return
    if np.size(ids) == 0:
        return
    if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
        low, high = jnp.min(ids), jnp.max(ids)  # reduced on the devices
        if isinstance(low, jax.core.Tracer):  # a global constant inside a trace: unknowable
            return
        low, high = int(low), int(high)
    else:  # a concrete array (also one closed over by a jitted function)
        values = np.asarray(ids)
        low, high = int(values.min()), int(values.max())
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise ValueError(
            f"{name}: token id {bad} is outside [0, {vocab_size}) "
            f"(vocab_size={vocab_size}); map the ids into the vocabulary or build "
            "the model with a larger vocab_size"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def check_config_values(
    config: Any,
    *,
    counts: tuple[str, ...] = (),
    rates: tuple[str, ...] = (),
    positives: tuple[str, ...] = (),
) -> None:
    """Raise a one-line ValueError naming ``Class(field=value)`` and the fix when a field of the
    dataclass ``config`` is out of range: ``counts`` positive integers (None passes: unset),
    ``rates`` probabilities in [0, 1) (dropout), ``positives`` finite numbers above 0 (widths,
    epsilons). Otherwise these fail deep inside a layer or, worse, silently change the model:
    ``dropout=1.5`` scaled activations by -2, ``glu_expand=0`` built a 1-unit GLU, a negative
    norm epsilon gave NaN."""
    owner = type(config).__name__

    def refuse(name: str, value: Any, needs: str) -> None:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be {needs}")

    for name in counts:
        value = getattr(config, name)
        if value is not None and not _is_count(value):
            refuse(name, value, "a positive integer")
    for name in rates:
        value = getattr(config, name)
        if not (_is_number(value) and 0.0 <= value < 1.0):
            refuse(name, value, "a probability in [0, 1) (0 turns it off)")
    for name in positives:
        value = getattr(config, name)
        if not (_is_number(value) and 0.0 < value < float("inf")):
            refuse(name, value, "a finite number above 0")


def check_counts(owner: str, *, none_passes: bool = True, **counts: Any) -> None:
    """Raise a one-line ValueError naming ``owner(name=value)`` for a count (a width ratio, a
    number of heads) that is not a positive integer; None passes (unset) if ``none_passes``."""
    for name, value in counts.items():
        if not (value is None and none_passes) and not _is_count(value):
            raise ValueError(f"{owner}({name}={value!r}): {name} must be a positive integer")


def check_flags(owner: str, **flags: Any) -> None:
    """Raise a one-line ValueError naming ``owner(name=value)`` for a flag that is not a bool:
    ``bidirectional="no"`` is truthy, and would silently build the other layer."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{owner}({name}={value!r}): {name} must be True or False")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_length(shape: tuple[int, ...], expected: str, name: str = "inputs") -> None:
    """Raise ValueError for an empty sequence axis (axis 1) of an input of ``shape``."""
    if len(shape) >= 2 and shape[1] == 0:
        raise ValueError(
            f"{name}: got shape {tuple(shape)} with length 0; expected {expected} with length >= 1"
        )


def check_width(features: Any, layer: str, name: str = "features") -> None:
    """Raise ValueError unless a layer's width ``features`` is a positive integer (0 failed as
    a ZeroDivisionError inside Flax's initializer)."""
    if isinstance(features, bool) or not isinstance(features, (int, np.integer)) or features < 1:
        raise ValueError(f"{layer}: {name} must be a positive integer; got {features!r}")


def check_rngs(rngs: Any, layer: str) -> None:
    """Raise ValueError unless ``rngs`` is an ``nnx.Rngs`` (None or a seed failed inside Flax's
    initializers with an AttributeError naming no layer)."""
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(
            f"{layer}: rngs must be an nnx.Rngs, e.g. rngs=nnx.Rngs(0); got {rngs!r}"[:200]
        )


def check_keywords(
    kwargs: dict[str, Any],
    base: Any,
    layer: str,
    *,
    own: tuple[str, ...] = (),
    fixed: tuple[str, ...] = (),
) -> None:
    """Raise TypeError naming ``layer`` (the public class) for a keyword in ``kwargs`` that
    ``base`` (the shared base's ``__init__``, which gets the rest) does not take, with the
    nearest valid name; a typo was reported against the private base class.

    ``own``: the keywords the public class takes itself; ``fixed``: the base's keywords that the
    public class sets itself.
    """
    accepted = [
        name
        for name, parameter in inspect.signature(base).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in fixed
    ]
    valid = sorted({*accepted, *own})
    for name in kwargs:
        if name in fixed:
            raise TypeError(f"{layer}() sets {name} itself; leave the argument {name!r} out")
        if name not in accepted:
            near = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(
                f"{layer}() got an unexpected keyword argument {name!r}{hint} "
                f"(it takes {', '.join(valid)})"
            )


def check_activations(x: Any, features: int | None, layout: str, layer: str) -> None:
    """Raise ValueError naming the fix unless ``x`` is an array of real floating-point
    activations whose last axis is ``features`` wide (None: any): integer and bool inputs were
    taken as activations without a word, complex ones failed deep in JAX, a list with an
    AttributeError, and a wrong width in a block's norm with a reshape error.

    ``layout`` is e.g. ``"(batch, length, d)"``; ``layer`` names the layer in the message.
    """
    if not (hasattr(x, "ndim") and hasattr(x, "dtype") and hasattr(x, "shape")):
        raise ValueError(
            f"{layer} expects an array {layout}; got a {type(x).__name__}: pass jnp.asarray(x)"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{layer} expects real floating-point activations {layout}; got {x.dtype}: embed "
            "token ids first (nnx.Embed), or cast with x.astype(jnp.float32)"
        )
    if features is not None and (x.ndim < 2 or x.shape[-1] != features):
        raise ValueError(
            f"{layer} expects {layout}; got shape {tuple(x.shape)} (this layer has d = {features})"
        )


def check_layer_input(x: jax.Array, features: int, layout: str, layer: str) -> None:
    """Raise ValueError naming the expected shape when a token mixer's input ``x`` is not an
    array of floats (:func:`check_activations`), has the wrong rank, a width other than
    ``features`` or an empty axis after the batch.

    ``layout`` is e.g. ``"(batch, length, d)"`` (its rank is its number of axes); ``layer`` names
    the layer in the message.
    """
    check_activations(x, None, layout, layer)
    rank = layout.count(",") + 1
    if x.ndim != rank or x.shape[-1] != features or 0 in x.shape[1:-1]:
        raise ValueError(
            f"{layer} expects {layout}; got shape {tuple(x.shape)} (this layer has "
            f"d = {features}, and every axis after the batch must be non-empty)"
        )


def check_mask(
    mask: jax.Array | None, x_shape: tuple[int, ...], layer: str, *, streaming: bool = False
) -> None:
    """Raise ValueError unless ``mask`` (None: no padding) is ``x``'s shape without the channels,
    (B, L) for ``x`` (B, L, d) or (B, H, W) for (B, H, W, d).

    ``streaming``: a ``step`` call, whose mask may be longer along time than ``x`` (fla's
    attention mask over the whole sequence so far): its last L steps are used.
    """
    if mask is None:
        return
    want, got = tuple(x_shape[:-1]), tuple(np.shape(mask))  # lists too
    longer_ok = streaming and len(got) == len(want) and got[:-1] == want[:-1]
    if got != want and not (longer_ok and got[-1] >= want[-1]):
        extra = " (or longer along time: its last steps are used)" if streaming else ""
        raise ValueError(
            f"{layer}: mask must be x's shape without the channels, {want}{extra}; got mask "
            f"of shape {got} for x of shape {tuple(x_shape)}"
        )


def check_state(state: jax.Array, want: tuple[int, ...], dtype: jnp.dtype, layer: str) -> None:
    """Raise ValueError naming both and the fix unless a streaming ``state`` has the shape
    ``want`` of the layer's ``init_state(B)`` for the batch ``B = want[0]`` of its input, and is
    complex where that state's ``dtype`` is and real where it is real (a complex state in a real
    mixer lost its imaginary part without a word; an integer one is no state), and is at least
    as wide as ``dtype`` (a bfloat16 state came back float32, and a scan refused the carry)."""
    got = tuple(np.shape(state))
    fix = f"start from layer.init_state({want[0]}) (or the state the previous step returned)"
    if got != tuple(want):
        raise ValueError(
            f"{layer}.step: state has shape {got}; for x of batch {want[0]} it must be "
            f"{tuple(want)}: {fix}"
        )
    got_dtype = jnp.result_type(state)
    complex_wanted = jnp.issubdtype(dtype, jnp.complexfloating)
    if not jnp.issubdtype(got_dtype, jnp.inexact) or (
        jnp.issubdtype(got_dtype, jnp.complexfloating) != complex_wanted
    ):
        kind = "complex" if complex_wanted else "real floating"
        raise ValueError(
            f"{layer}.step: state has dtype {got_dtype}; this layer's state is {kind} "
            f"({jnp.dtype(dtype)}): {fix}"
        )
    if jnp.promote_types(dtype, got_dtype) != got_dtype:
        raise ValueError(
            f"{layer}.step: state has dtype {got_dtype}, narrower than this layer's state "
            f"({jnp.dtype(dtype)}), which a step would return (a lax.scan carry must keep its "
            f"type): {fix}, or cast it with .astype(layer.state_dtype)"
        )


def check_method(method: str, methods: tuple[str, ...], layer: str) -> None:
    """ValueError naming ``layer`` and the choices when ``method`` is not ``"auto"`` or one of
    ``methods`` (checked when the layer is built, not at its first call)."""
    if method != "auto" and method not in methods:
        raise ValueError(
            f"{layer}: unknown method {method!r}; choose one of {', '.join(('auto', *methods))}"
        )
