"""The registry's entry for a dataset (:class:`Dataset`): its name, model family, sources and
tfds release.

A dataset module (``hgrn_jax/tasks/<dataset>.py``) defines one
:class:`~hgrn_jax.tasks.array_task.ArrayTask` subclass per data source and a :class:`Dataset`
whose ``sources`` table maps ``config.data.source`` to them (docs/tasks.md).
"""

from __future__ import annotations

import dataclasses
import inspect
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
                f"set --config.data.source to one of {', '.join(self.sources)}"
            )
        return self.sources[source]

    def task(self, config) -> ArrayTask:
        return self.source(config)(config, self.name)

    def derive(self, config):
        """``config`` with the derived settings of its source filled in (no data read).

        A source class whose ``derive`` is not a ``@classmethod``, or returns something else
        than a config, raises a ValueError naming it (a raw TypeError, or an AttributeError
        on ``None`` inside the registry, used to)."""
        source = self.source(config)
        name = f"{getattr(source, '__name__', type(source).__name__)}.derive"
        if isinstance(source, type) and not isinstance(
            inspect.getattr_static(source, "derive", None), (classmethod, staticmethod)
        ):
            raise ValueError(
                f"{name} of task {self.name!r} must be a @classmethod, def derive(cls, "
                "config), returning the config with its settings filled in (docs/tasks.md)"
            )
        derived = source.derive(config)
        if not hasattr(derived, "model"):
            raise ValueError(
                f"{name} of task {self.name!r} returned {type(derived).__name__}, not a config; "
                "end it with `return config` (docs/tasks.md)"
            )
        return derived
