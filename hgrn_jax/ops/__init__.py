"""Pure array functions (no Flax): the linear recurrence behind HGRN."""

from hgrn_jax.ops.recurrence import METHODS, linear_recurrence, default_method

__all__ = ["METHODS", "linear_recurrence", "default_method"]
