"""Input checks of the models' entry points: token ids inside the vocabulary, non-empty sequences.

Token ids. An embedding lookup of an id ``>= vocab_size`` returns NaN under JAX's default
out-of-bounds gather, and a negative id silently reads another row (``-1`` is the last one).
So the models check their ids:

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
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

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
    ``ids`` leaves ``[0, vocab_size)``."""
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


def check_length(shape: tuple[int, ...], expected: str, name: str = "inputs") -> None:
    """Raise ValueError for an empty sequence axis (axis 1) of an input of ``shape``."""
    if len(shape) >= 2 and shape[1] == 0:
        raise ValueError(
            f"{name}: got shape {tuple(shape)} with length 0; expected {expected} with length >= 1"
        )
