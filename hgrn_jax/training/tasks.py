"""Deprecated: the tasks moved to :mod:`hgrn_jax.tasks` (one module per dataset, one registry).

``hgrn_jax.training.tasks.get_task`` and the other names here keep working and warn once.
"""

from __future__ import annotations

import warnings

from hgrn_jax.deprecation import HGRNDeprecationWarning
from hgrn_jax.tasks import (
    TASKS,
    DataUnavailableError,
    Task,
    build_model,
    classification_loss,
    get_task,
    model_config,
    next_token_loss,
)

warnings.warn(
    "hgrn_jax.training.tasks is deprecated; import hgrn_jax.tasks instead",
    HGRNDeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "TASKS",
    "DataUnavailableError",
    "Task",
    "build_model",
    "classification_loss",
    "get_task",
    "model_config",
    "next_token_loss",
]
