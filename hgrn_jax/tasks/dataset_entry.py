"""The registry's entry for a dataset (:class:`Dataset`): its name, model family, sources and
tfds release.

A dataset module (``hgrn_jax/tasks/<dataset>.py``) defines one
:class:`~hgrn_jax.tasks.array_task.ArrayTask` subclass per data source and a :class:`Dataset`
whose ``sources`` table maps ``config.data.source`` to them (docs/tasks.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from hgrn_jax.tasks.array_task import ArrayTask
from hgrn_jax.tasks.model_settings import ModelKind
from hgrn_jax.tasks.prepared_tfds import TfdsRelease

SourceFactory = Callable[[Any, str], ArrayTask]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One row of the registry: a dataset's name (``config.task``), model family and sources.

    ``sources`` maps each ``config.data.source`` value to the task class reading it (or a
    :class:`ReleaseOrPrepared`); ``tfds`` says how its release is prepared as tfds data, if it
    can be.
    """

    name: str
    model: ModelKind
    sources: Mapping[str, Any]
    tfds: TfdsRelease | None = None

    def source(self, config) -> Any:
        source = config.data.source
        if source not in self.sources:
            raise ValueError(
                f"data.source {source!r} is not available for task {self.name!r}; "
                f"choose one of {', '.join(self.sources)}"
            )
        return self.sources[source]

    def task(self, config) -> ArrayTask:
        return self.source(config)(config, self.name)

    def derive(self, config):
        """``config`` with the derived settings of its source filled in (no data read)."""
        return self.source(config).derive(config)
