"""One process of the two-process data tests: Pathfinder batches assembled into global arrays.

Run as ``python tests/data_multihost_worker.py --lra_dir D [--tfds_dir T] --out F`` with
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` (2) and ``JAX_PROCESS_ID`` set
(:func:`run_two_processes` does that). Each process has 4 simulated CPU devices, reads only its own
rows (from the release through the shared ``.npy`` cache, which the processes race to prepare; or,
with ``--tfds_dir``, from the prepared tfds data), and builds every global batch with
``jax.make_array_from_process_local_data`` on a ``data`` mesh axis over all 8 devices; process 0
writes the example ids (fixture image i is grey i) of every global training and evaluation batch
to ``F`` (.npz), and the name of its task class as ``task``. With ``--tfds_dir`` each process ``p``
also writes the record indices it read from each split's data source to ``F.reads<p>.npz``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

TRAIN_STEPS = 8  # two epochs of 32 examples in batches of 8


def pathfinder_config(lra_dir: str, tfds_dir: str = ""):
    config = importlib.import_module("experiments.configs.lra.pathfinder").get_config("tiny")
    config.data.source = "release"
    config.data.lra_dir = lra_dir
    config.data.tfds_dir = tfds_dir
    config.data.cache_dir = os.path.join(lra_dir or tfds_dir, "cache")
    config.data.image_size = 32
    config.data.seq_len = 1024
    config.model.grid_shape = (32, 32)
    config.batch_size = 8
    config.eval_batch_size = 8
    return config


def example_ids(batch) -> np.ndarray:
    import numpy as np

    return np.round((batch["inputs"][:, 0, 0] + 1.0) * 127.5).astype(np.int32)


class RecordingSource:
    """Wraps a tfds data source; lists the record indices read through it."""

    def __init__(self, source, read: list):
        self.source, self.read = source, read

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, rows):
        self.read.extend(int(r) for r in rows)
        return self.source.__getitems__(rows)


def run_two_processes(
    out: Path, lra_dir: str, tfds_dir: str = "", timeout: float = 240
) -> dict[str, np.ndarray]:
    """Run this worker as two JAX processes (loopback coordinator, gloo) and return what
    process 0 wrote to ``out``; fails with a process's log when one exits with an error."""
    import numpy as np
    from two_processes import run_two_processes as launch

    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--lra_dir",
        lra_dir,
        "--tfds_dir",
        tfds_dir,
        "--out",
        str(out),
    ]
    launch(command, timeout=timeout)
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lra_dir", required=True)
    parser.add_argument("--tfds_dir", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from hgrn_jax import sharding as sh

    assert sh.maybe_initialize_distributed()
    import itertools

    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from hgrn_jax import tasks

    index, count = jax.process_index(), jax.process_count()
    task = tasks.get_task(pathfinder_config(args.lra_dir, args.tfds_dir))
    reads: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    if args.tfds_dir:
        for split, read in reads.items():
            records = task.examples(split)["pixels"].records
            records.source = RecordingSource(records.source, read)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))

    def gather(local: np.ndarray) -> np.ndarray:
        array = jax.make_array_from_process_local_data(sharding, local)
        assert array.shape[0] == 8  # the global batch
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))

    out = {}
    for step, batch in enumerate(
        itertools.islice(task.train_batches(0, index, count), TRAIN_STEPS)
    ):
        out[f"train/{step}"] = gather(example_ids(batch))
    for split in ("val", "test"):
        for k, batch in enumerate(task.eval_batches(split, index, count)):
            out[f"{split}/{k}/ids"] = gather(example_ids(batch))
            out[f"{split}/{k}/weight"] = gather(batch["weight"])
    if args.tfds_dir:
        np.savez(
            f"{args.out}.reads{index}.npz", **{k: np.array(v, np.int64) for k, v in reads.items()}
        )
    if index == 0:
        np.savez(args.out, task=np.array(type(task).__name__), **out)


if __name__ == "__main__":
    main()
