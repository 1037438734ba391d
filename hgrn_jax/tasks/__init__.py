"""Tasks: the data, model and loss of each experiment behind the :class:`Task` protocol.

One module per dataset (``listops``, ``text``, ``retrieval``, ``image``, ``pathfinder`` with
Path-X, ``imagenet``, ``wikitext103``), each with a table of its data sources; one registry
(:mod:`hgrn_jax.tasks.registry`). ``get_task(config)`` returns the task of ``config.task``
reading ``config.data.source``, a task of the user's own (``"module:factory"``) included.
"""

from hgrn_jax.data.errors import DatasetMissingError
from hgrn_jax.tasks.losses import classification_loss, next_token_loss, soft_target_loss
from hgrn_jax.tasks.protocol import Batch, Task
from hgrn_jax.tasks.registry import (
    DATASETS,
    TASKS,
    build_model,
    dataset,
    get_task,
    model_config,
    model_defaults,
    tfds_release,
)

DataUnavailableError = DatasetMissingError
"""The one error for data that are missing or not prepared (the message says what to do)."""

__all__ = [
    "DATASETS",
    "TASKS",
    "Batch",
    "DataUnavailableError",
    "DatasetMissingError",
    "Task",
    "build_model",
    "classification_loss",
    "dataset",
    "get_task",
    "model_config",
    "model_defaults",
    "next_token_loss",
    "soft_target_loss",
    "tfds_release",
]
