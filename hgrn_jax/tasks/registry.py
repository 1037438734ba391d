"""The registry: ``config.task`` -> its :class:`~hgrn_jax.tasks.dataset_entry.Dataset` (one line
each), or a task of the user's own, ``"package.module:factory"``.

The only place where task names are looked up. Adding a dataset is one module defining its
``Dataset`` and one line here (docs/tasks.md walks through an example); a module outside the
package is named ``module:DATASET`` (its ``Dataset``) or ``module:factory`` (a function
``factory(config) -> Task``) instead, with its folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from typing import Any

from flax import nnx

from hgrn_jax.tasks import (
    image,
    imagenet,
    listops,
    model_settings,
    pathfinder,
    retrieval,
    text,
    wikitext103,
)
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.prepared_tfds import TfdsRelease
from hgrn_jax.tasks.protocol import Task, a_type_name, check_task

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        listops.DATASET,
        text.DATASET,
        retrieval.DATASET,
        image.DATASET,
        pathfinder.PATHFINDER,
        pathfinder.PATHX,
        imagenet.DATASET,
        wikitext103.DATASET,
    )
}
TASKS = tuple(DATASETS)


def task_factory(config) -> Any:
    """What ``config.task = "package.module:factory"`` names, imported: a function
    ``factory(config) -> Task``, or a :class:`Dataset` such as a dataset module's ``DATASET``;
    None for a name without a colon (the registry's). A ValueError naming ``config.task`` and
    the fix when the module or the name in it cannot be found."""
    name = str(config.task)
    if ":" not in name:
        return None
    module_name, _, attr = name.partition(":")
    where = f"config.task={name!r}: cannot import {attr!r} from {module_name!r}"
    folder, _, file = module_name.replace("\\", "/").rpartition("/")
    stem = file.removesuffix(".py").lstrip(".")  # '.own_tasks' is relative: no package here
    not_a_file = (
        f"{where}: name the module as Python imports it, not its file: "
        f"--config.task={stem}:{attr} with the folder holding "
        f"{stem.replace('.', '/')}.py on PYTHONPATH (PYTHONPATH={folder or '.'})"
    )
    if "/" in module_name or "\\" in module_name or module_name.startswith("."):
        raise ValueError(not_a_file)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        if module_name.endswith(".py"):
            raise ValueError(not_a_file) from error
        if isinstance(error, ModuleNotFoundError) and (
            module_name == missing or module_name.startswith(missing + ".")
        ):
            raise ValueError(
                f"{where}: no module named {missing!r} in any folder on PYTHONPATH; add the "
                f"folder holding {missing.replace('.', '/')}.py (or that package) to it"
            ) from error
        raise ValueError(
            f"{where}: the module was found but importing it failed ({error}); "
            "rerun with --traceback to see the import that failed"
        ) from error
    if not hasattr(module, attr):
        offers = [
            key
            for key, value in vars(module).items()
            if not key.startswith("_")
            and (
                isinstance(value, Dataset)
                or (inspect.isfunction(value) and value.__module__ == module.__name__)
            )
        ]
        close = difflib.get_close_matches(attr, offers, n=1)
        raise ValueError(
            f"{where}: {module_name!r}"
            + (f" ({module.__file__})" if getattr(module, "__file__", None) else "")
            + f" has no {attr!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; name its Dataset (module:DATASET) or a function factory(config) -> Task"
            + (f"; it defines {', '.join(offers)}" if offers else "")
        )
    return getattr(module, attr)


def dataset(config) -> Dataset:
    """The registry entry of ``config.task``, or the :class:`Dataset` a ``module:DATASET``
    names; an unknown name lists the known ones, and a ``module:factory`` (a function, which
    has no sources or model family to look up) is a ValueError saying what takes it."""
    factory = task_factory(config)
    if isinstance(factory, Dataset):
        return factory
    if factory is not None:
        raise ValueError(
            f"config.task={config.task!r} names {a_type_name(factory)}, not a Dataset: its "
            "task is made by calling it (hgrn_jax.tasks.get_task(config), experiments.train), "
            "and it has no data sources, model family or tfds release to look up here; name "
            "a dataset module's Dataset (module:DATASET) or a task of the registry: "
            f"{', '.join(TASKS)}"
        )
    if config.task not in DATASETS:
        close = difflib.get_close_matches(str(config.task), TASKS, n=1)
        raise ValueError(
            f"unknown config.task {config.task!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; set --config.task to one of "
            f"{', '.join(TASKS)}, or to 'package.module:factory' for a task of your own "
            "(docs/tasks.md)"
        )
    return DATASETS[config.task]


def get_task(config) -> Task:
    """The task of ``config.task`` reading ``config.data.source``: a name of the registry, or
    ``"package.module:factory"`` for a task of the user's own (``factory(config) -> Task``, or
    a dataset module's :class:`Dataset`, ``module:DATASET``), its folder on ``PYTHONPATH``.
    Errors name the key to fix: a factory that cannot be called with the config alone, or
    whose task lacks a member of the :class:`~hgrn_jax.tasks.protocol.Task` protocol."""
    factory = task_factory(config)
    if factory is None:
        return dataset(config).task(config)
    where = f"config.task={str(config.task)!r}"
    if isinstance(factory, Dataset):
        return check_task(factory.task(config), where)
    try:
        takes_config = callable(factory) and bool(inspect.signature(factory).bind(config))
    except TypeError:
        takes_config = False
    except ValueError:  # no signature to inspect (some builtins): let the call tell
        takes_config = True
    if not takes_config:
        raise ValueError(
            f"{where} is {a_type_name(factory)} that cannot be called with the config "
            "alone; name a function factory(config) -> Task, or a dataset module's Dataset "
            "(e.g. module:DATASET)"
        )
    return check_task(factory(config), where)


def model_config(config) -> Any:
    """The model dataclass of ``config`` with the derived settings of its source filled in."""
    entry = dataset(config)
    model_settings.check_model_sizes(config.model)  # before deriving divides by them
    return model_settings.model_config(entry.derive(config), entry.model)


def registered_dataset(config) -> Dataset | None:
    """The registry entry of ``config.task``; None for another name (``module:factory``)."""
    return DATASETS.get(str(config.get("task", "")))


def check_model_sizes(config, entry: Dataset | None = None) -> None:
    """Raise ValueError naming ``config.model.<key>`` when a model size is below 1
    (:func:`model_settings.check_model_sizes`): as the config sets it (0: from the data) and,
    for a task with a :class:`Dataset` (``entry``, by default the registry's; a
    ``module:DATASET`` one's passed in), as its data source fills it in (no data read); for such
    a task also a mixer option its model would not honour or a mixer without the model's
    direction (:func:`model_settings.check_mixer_options`; the settings it drops are warned of
    once, as the model is built)."""
    model_settings.check_model_sizes(config.get("model", None))
    entry = entry or registered_dataset(config)
    if entry is not None:
        model_settings.check_mixer_options(
            config.get("model", None), causal=entry.model.causal, warn=False
        )
        # A vocabulary size of 0 is still left to the data after deriving: the task reads it
        # from its files (the tokenizer, the vocabulary, tfds metadata) when it is built.
        from_files = ["vocab_size"]
        model_settings.check_model_sizes(
            entry.derive(config).model, model_settings.unused_sizes(entry.model) + from_files
        )


def check_model_and_settings(config, entry: Dataset | None = None) -> None:
    """What a run can check of ``config`` without its data, before it writes anything, beyond
    :func:`check_model_sizes` (which it assumes passed): for a task with a :class:`Dataset`
    (``entry``, as in :func:`check_model_sizes`), every rule of its model's config class (built
    from the derived config, its warnings left to the model's build) and the settings its data
    source does not read (a data folder, a label smoothing). Each a ValueError naming the key
    and the fix."""
    entry = entry or registered_dataset(config)
    if entry is None:
        return
    derived = entry.derive(config)
    if derived.model.get("vocab_size", None) == 0:
        derived.model.vocab_size = 1  # still the files' to say (a tokenizer, the vocabulary)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", model_settings.IgnoredSettingWarning)
        model_settings.model_config(derived, entry.model)
    entry.source(config)._check_unread_settings(config)


def model_defaults(config) -> dict[str, Any]:
    """The values ``model`` keys absent from ``config`` stand for (the task's model dataclass
    defaults, :func:`model_settings.model_field_defaults`), which the resume check compares a run
    saved before a field existed with; empty for a task outside the registry
    (``"module:factory"``)."""
    entry = DATASETS.get(str(config.get("task", "")))
    return model_settings.model_field_defaults(entry.model) if entry is not None else {}


def build_model(config, rngs: nnx.Rngs) -> nnx.Module:
    """The model of ``config`` (activations in ``config.dtype``, float32 parameters), built
    without reading data (a vocabulary taken from the data needs ``get_task(config)``)."""
    entry = dataset(config)
    model_settings.check_model_sizes(config.model)  # before deriving divides by them
    return model_settings.build_model(entry.derive(config), entry.model, rngs)


def tfds_release(config) -> TfdsRelease:
    """How ``config``'s dataset is prepared as tfds data; an error if it has no builder."""
    entry = dataset(config)
    if entry.tfds is None:
        raise ValueError(
            f"task {entry.name!r} has no tfds builder to prepare; "
            f"{', '.join(n for n, d in DATASETS.items() if d.tfds)} have one"
        )
    return entry.tfds
