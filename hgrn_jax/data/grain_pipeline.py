"""grain input pipelines over prepared random-access data (first increment; not yet used by tasks).

A :class:`ArraySource` serves rows of same-length arrays or array-likes (the memory-mapped
``.npy`` caches of :func:`hgrn_jax.data.loader.load_arrays`, or the array_record columns of
:func:`hgrn_jax.data.tfds_builders.open_split`) by index. :func:`train_loader` reads them with
grain: records sharded by process (each process reads only its own), shuffled per epoch from
``seed``, transformed (in ``worker_count`` worker processes when > 0) and batched to the
process-local batch. The iterator's state (``get_state()`` / ``set_state()``, a few bytes) is
the pipeline's whole position, to be saved with the checkpoint.

Explicit arguments only: this module knows nothing of experiment configs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


class ArraySource:
    """grain's random-access protocol over same-length arrays: ``len`` and ``source[i]``.

    ``name`` (e.g. the prepared folder) identifies the data in ``repr``, which grain compares
    with the checkpointed iterator state's when resuming.
    """

    def __init__(self, arrays: Mapping[str, Any], name: str = ""):
        self.name = name
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the arrays of a source must have one length; got {lengths}")
        self.arrays = dict(arrays)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        columns = ", ".join(
            f"{key}: {np.dtype(getattr(value, 'dtype', 'O'))}"
            f"{tuple(np.shape(value[0])) if self._length else ()}"
            for key, value in self.arrays.items()
        )
        return f"ArraySource({self.name!r}, {self._length} rows, {columns})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: np.asarray(value[index]) for key, value in self.arrays.items()}


def train_loader(
    source: ArraySource,
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
):
    """An endless grain ``DataLoader`` of process-local training batches.

    ``batch_size`` is the global batch; each of the ``process_count`` processes reads its shard
    of the records (``ShardOptions``, remainder dropped) and batches ``batch_size /
    process_count`` of them, the last partial batch of an epoch dropped. Every epoch visits
    each record of the shard once, in an order drawn from ``seed`` and the epoch.
    """
    import grain.python as grain

    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the number of "
            f"processes ({process_count})"
        )
    local = batch_size // process_count
    shard = grain.ShardOptions(
        shard_index=process_index, shard_count=process_count, drop_remainder=True
    )
    if len(source) // process_count < local:
        raise ValueError(
            f"each process's shard ({len(source) // process_count} records) is "
            f"smaller than its batch ({local}); lower the batch size"
        )
    sampler = grain.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=True, num_epochs=None, seed=int(seed)
    )
    operations = []
    if transform is not None:
        operations.append(_Transform(transform))
    operations.append(grain.Batch(batch_size=local, drop_remainder=True))
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=operations, worker_count=int(worker_count)
    )


class _Transform:
    """A picklable grain ``MapTransform`` around a plain function (for worker processes)."""

    def __new__(cls, fn):
        import grain.python as grain

        class Transform(grain.MapTransform):
            def map(self, element):
                return fn(element)

        return Transform()
