"""Pure array functions (no Flax): the linear recurrence behind HGRN and HGRN2's matrix-state one,
and batch normalisation with its closed-form gradient."""

from hgrn_jax.ops.batch_norm import batch_norm_train
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
    "batch_norm_train",
]
