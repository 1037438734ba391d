"""Which task a run trains: ``config.task``, a name of the registry or a ``module:factory``."""

from __future__ import annotations

from typing import Any

from hgrn_jax.tasks.registry import get_task, task_factory
from hgrn_jax.training.workdir import mixer_kind

resolve_task = get_task
"""The task of ``config.task`` (:func:`hgrn_jax.tasks.get_task`): the loop's name for it."""


def check_task_name(config: Any) -> None:
    """ValueError naming ``config.task`` when it is neither a task of the registry nor a
    ``module:factory`` that can be imported (checked before a run touches its workdir)."""
    if task_factory(config) is None:
        from hgrn_jax.tasks import dataset

        dataset(config)


def dataset_entry(config: Any) -> Any:
    """The :class:`~hgrn_jax.tasks.dataset_entry.Dataset` of ``config.task``: the registry's,
    or the one a ``module:DATASET`` names; None for a ``module:factory`` task, a name the
    registry lacks or a config without a task. ValueError as :func:`task_factory`."""
    if not (hasattr(config, "get") and config.get("task")):
        return None
    from hgrn_jax.tasks.dataset_entry import Dataset

    factory = task_factory(config)
    if factory is None:
        from hgrn_jax.tasks.registry import registered_dataset

        return registered_dataset(config)
    return factory if isinstance(factory, Dataset) else None


def data_source(config: Any, task: Any) -> str | None:
    """The data source ``task`` reads, as the start-up line and results.json name it: its own
    ``data_source`` attribute if it has one; else ``config.data.source`` for a task that reads
    it (of the registry, or a :class:`~hgrn_jax.tasks.dataset_entry.Dataset` named as
    ``module:DATASET``); else None: a ``module:factory`` task reads what it reads."""
    own = getattr(task, "data_source", None)
    if isinstance(own, str):
        return own
    from hgrn_jax.tasks.dataset_entry import Dataset

    factory = task_factory(config)
    if factory is not None and not isinstance(factory, Dataset):
        return None
    data = config.get("data", None) if hasattr(config, "get") else None
    source = data.get("source", None) if hasattr(data, "get") else None
    return None if source is None else str(source)


def quoted_paper_number(config: Any) -> float | None:
    """The paper's number results.json quotes beside the run: ``config.paper.value``, or None
    when it is 0 (not known) or marked as another run's, ``paper.task`` or ``paper.mixer``
    naming another task or token mixer than the run's (a config copied from another experiment;
    ``experiments.train`` quotes the right paper number instead, setting the marks: called from
    Python, the other run's number used to be quoted)."""
    paper = config.get("paper", None) if hasattr(config, "get") else None
    if not hasattr(paper, "get"):
        return None
    task, kind = str(config.get("task", "")), mixer_kind(config)
    if (paper.get("task", task), paper.get("mixer", kind)) != (task, kind):
        return None
    return paper.get("value", None) or None
