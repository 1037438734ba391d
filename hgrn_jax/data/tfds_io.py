"""Reading prepared tfds datasets without ever downloading (tensorflow imported on use)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hgrn_jax.data import loader
from hgrn_jax.data.errors import DatasetMissingError


def _prepare_hint(name: str, tfds_dir: str) -> str:
    where = tfds_dir or "~/tensorflow_datasets"
    return (
        f'prepare it once where the internet is reachable with `python -c "import '
        f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{where}')"
        f'.download_and_prepare()"` and copy that folder here, then set '
        f"--config.data.tfds_dir={where} (see docs/data.md)"
    )


def builder(name: str, tfds_dir: str):
    """The tfds builder of ``name`` reading from ``tfds_dir`` (tfds's default when empty)."""
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=tfds_dir or None)


def fingerprint(name: str, tfds_dir: str) -> list:
    """Identity of the prepared files of ``name`` (their dataset_info.json), for cache keys."""
    folder = Path(tfds_dir or Path.home() / "tensorflow_datasets") / name
    infos = sorted(folder.glob("**/dataset_info.json")) if folder.is_dir() else []
    return [str(folder.resolve())] + loader.fingerprint(infos)


def iterate(name: str, split: str, tfds_dir: str) -> Iterator[dict[str, Any]]:
    """The examples of a prepared split as numpy dicts, in the stored (deterministic) order."""
    import tensorflow_datasets as tfds

    b = builder(name, tfds_dir)
    try:
        ds = b.as_dataset(
            split=split, shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
        )
    except AssertionError as error:  # tfds's "could not find data in ..."
        raise DatasetMissingError(
            f"tfds dataset {name!r} is not prepared in data.tfds_dir={tfds_dir!r}: "
            f"{_prepare_hint(name, tfds_dir)}"
        ) from error
    return iter(tfds.as_numpy(ds))


def read_all(name: str, split: str, tfds_dir: str, keys: tuple[str, ...]) -> dict[str, list[Any]]:
    """Every example of a split: ``{key: [value, ...]}``."""
    out: dict[str, list[Any]] = {key: [] for key in keys}
    for example in iterate(name, split, tfds_dir):
        for key in keys:
            out[key].append(example[key])
    return out


def data_source(name: str, split: str, tfds_dir: str, command: str = ""):
    """tfds's random-access source of a split prepared in the ``array_record`` format;
    ``command``, the one that prepares it, goes into the error when it is not there."""
    b = builder(name, tfds_dir)
    try:
        return b.as_data_source(split=split)
    except (AssertionError, FileNotFoundError, ValueError, NotImplementedError) as error:
        how = f"prepare it with `{command}`" if command else "see docs/data.md"
        raise DatasetMissingError(
            f"tfds dataset {name!r} is not prepared (in the array_record format) in "
            f"data.tfds_dir={tfds_dir!r}: {how} "
            f"({type(error).__name__}: {str(error)[:200]})"
        ) from error


def check_labels(labels: np.ndarray, num_classes: int, name: str, split: str, report) -> np.ndarray:
    """Boolean mask of in-range labels; out-of-range ones are added to ``report``."""
    ok = (labels >= 0) & (labels < num_classes)
    for i in np.flatnonzero(~ok):
        report.add(
            f"tfds {name} {split} example {i}",
            0,
            f"label {int(labels[i])} not in 0..{num_classes - 1}",
        )
    return ok
