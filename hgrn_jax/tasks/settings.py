"""Config values for tasks: plain copies, settings that follow from the data, data switches.

A source class's ``derive`` fills in, on the copy of :func:`copy_config`, the settings its data
decide: :func:`settle` where the config leaves one at 0 and :func:`check_vocab_size` for the
vocabulary (docs/tasks.md).
"""

from __future__ import annotations

import copy
from typing import Any


def plain(value: Any) -> Any:
    """ConfigDict/list values as plain Python (lists become tuples, for frozen dataclasses)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


def copy_config(config):
    """An independent copy (the task fills in derived settings without touching the caller's)."""
    if hasattr(config, "copy_and_resolve_references"):
        return config.copy_and_resolve_references()
    return copy.deepcopy(config)


def settle(config, key: str, value: Any, why: str) -> None:
    """Set ``config.<key>`` (e.g. ``"model.grid_shape"``) to the derived ``value`` when it is
    unset (0 or empty); an explicit value that disagrees is an error saying ``why``."""
    section, name = key.split(".")
    current = config[section].get(name)
    if current in (None, 0, "", (), []):
        config[section][name] = value
        return
    if plain(current) != plain(value):
        raise ValueError(
            f"config.{key}={plain(current)} disagrees with {why}: set "
            f"--config.{key}={plain(value)}, or 0 to derive it"
        )


def check_vocab_size(config, size: int, what: str) -> None:
    """Token ids of the data run up to ``size - 1``: the embedding needs that many rows (a
    ``model.vocab_size`` of 0 becomes ``size``)."""
    if not config.model.vocab_size:
        config.model.vocab_size = int(size)
    elif size > config.model.vocab_size:
        raise ValueError(
            f"config.model.vocab_size {config.model.vocab_size} is smaller than "
            f"{what} vocabulary ({size} ids); set --config.model.vocab_size={size}"
        )


def skip_bad_rows(config) -> bool:
    return bool(config.data.get("skip_bad_rows", False))
