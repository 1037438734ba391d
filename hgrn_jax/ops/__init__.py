"""Pure array functions (no Flax): the linear recurrence behind HGRN and HGRN2's matrix-state one."""

from hgrn_jax.ops.matrix_recurrence import (
    MATRIX_METHODS,
    default_matrix_method,
    matrix_recurrence,
)
from hgrn_jax.ops.recurrence import METHODS, default_method, linear_recurrence

__all__ = [
    "METHODS",
    "linear_recurrence",
    "default_method",
    "MATRIX_METHODS",
    "matrix_recurrence",
    "default_matrix_method",
]
