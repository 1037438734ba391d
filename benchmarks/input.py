"""Input pipeline throughput on CPU: examples per second of every real-data pipeline.

Runs each task's ``train_batches`` (and ``eval_batches``) at the paper's sequence lengths and
batch sizes on generated fixtures in the release layouts (``tests/data_fixtures.py`` style) and on
``tfds.testing.mock_data`` for IMDB and CIFAR-10, and on ImageNet prepared by tfds from small
archives of 500 x 375 JPEGs (threads, and 2 worker processes), after a first batch that prepares the
cache (timed separately as ``prepare_s``). The release datasets (ListOps, Retrieval, Pathfinder,
Path-X, WikiText-103) are measured twice in the same run: from their ``.npy`` caches and from the
same fixture prepared into tfds data (``experiments.prepare`` with ``data.tfds_dir``, timed as
``tfds_prepare_s``; rows ``... tfds``, with ``vs_npy`` = their examples/s over the ``.npy`` row's).
Writes ``benchmarks/results/input_<platform>.json``.

    python benchmarks/input.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchmarks.common import write_results


def config_of(name, **data):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    for key, value in data.items():
        config.data[key] = value
    return config


def throughput(iterator_fn, batch_size: int, seconds: float) -> dict:
    start = time.perf_counter()
    iterator = iterator_fn()
    next(iterator)
    prepare = time.perf_counter() - start
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += 1
    elapsed = time.perf_counter() - start
    return {
        "prepare_s": round(prepare, 3),
        "batches": count,
        "examples_per_s": round(count * batch_size / elapsed, 1),
    }


def write_aan(root: Path, rows: int, doc_bytes: int, rng) -> None:
    folder = root / "tsv_data"
    folder.mkdir(parents=True)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz .,\t", np.uint8)
    for split in ("train", "eval", "test"):
        lines = []
        for i in range(rows):
            docs = [
                letters[rng.integers(0, len(letters), doc_bytes)].tobytes().decode()
                for _ in range(2)
            ]
            lines.append(f'{i % 2}\ta{i}\tb{i}\t"{docs[0]}"\t"{docs[1]}"\n')
        (folder / f"new_aan_pairs.{split}.tsv").write_text("".join(lines))


def cases(tmp: Path, rng):
    """(name, config) of every pipeline, its data written under ``tmp``."""
    import data_fixtures as fx

    from hgrn_jax.data import listops

    lra = tmp / "lra_release"
    # Validation splits span at least two eval batches: the tfds columns keep the last batch's
    # records, so cycling one batch would time a cache hit, not a read.
    listops.write_tsv(
        lra / "listops-1000",
        listops.generate(
            listops.ListOpsSpec(
                min_length=500, max_length=2000, num_train=256, num_val=256, num_test=64
            ),
            seed=0,
        ),
    )
    yield (
        "listops (release, 2048)",
        config_of("lra.listops", lra_dir=str(tmp), cache_dir=str(tmp / "cache")),
    )
    write_aan(lra, 256, 4500, rng)
    yield (
        "retrieval (AAN, 2 x 4000)",
        config_of("lra.retrieval", lra_dir=str(tmp), cache_dir=str(tmp / "cache")),
    )
    fx.write_pathfinder(lra, 32, count=2560)
    yield (
        "pathfinder (32 x 32)",
        config_of("lra.pathfinder", lra_dir=str(tmp), cache_dir=str(tmp / "cache")),
    )
    fx.write_pathfinder(lra, 128, count=200)
    yield (
        "pathx (128 x 128)",
        config_of("lra.pathx", lra_dir=str(tmp), cache_dir=str(tmp / "cache")),
    )
    wiki = fx.write_wikitext(tmp / "wikitext", repeats=2000)
    tok = fx.write_bpe_tokenizer(tmp / "tokenizer.json")
    config = config_of(
        "lm.wikitext103",
        wikitext_dir=str(wiki),
        tokenizer_path=str(tok),
        cache_dir=str(tmp / "cache"),
    )
    config.batch_size = 16
    yield "wikitext103 (BPE, 512)", config


def tfds_cases(tmp: Path):
    yield "text (IMDB mock, 4096)", config_of("lra.text", cache_dir=str(tmp / "cache"))
    yield "image (CIFAR-10 mock, crop+flip)", config_of("lra.image", cache_dir=str(tmp / "cache"))


def imagenet_cases(tmp: Path):
    """ImageNet prepared by tfds from archives of 500 x 375 JPEGs (the typical ImageNet size)."""
    import data_fixtures as fx

    from hgrn_jax.data import imagenet

    fx.write_imagenet_archives(
        tmp / "manual",
        synsets=("n01440764", "n01443537"),
        per_class=64,
        num_val=64,
        width=500,
        height=375,
    )
    imagenet.prepare(str(tmp / "tfds"), str(tmp / "manual"))
    for workers in (0, 2):
        config = config_of("imagenet.tiny", tfds_dir=str(tmp / "tfds"), workers=workers)
        config.model.num_classes = 1000
        config.data.image_size = 224  # DeiT's crop (the loader does not build the model)
        config.batch_size = 32
        config.eval_batch_size = 32
        what = "threads" if workers == 0 else f"{workers} worker processes"
        yield f"imagenet (JPEG, DeiT aug, {what})", config


def measure(name, config, seconds) -> dict:
    from hgrn_jax import tasks

    task = tasks.get_task(config)
    batch = config.eval_batch_size or config.batch_size
    row = {
        "pipeline": name,
        "task": config.task,
        "batch_size": config.batch_size,
        "seq_len": config.data.seq_len,
        "train": throughput(lambda: task.train_batches(0, 0, 1), config.batch_size, seconds),
        "eval": throughput(lambda: iter(_cycle(task, batch)), batch, seconds),
    }
    print(
        f"{name:36s} train {row['train']['examples_per_s']:>9} ex/s   "
        f"eval {row['eval']['examples_per_s']:>9} ex/s   prepare "
        f"{row['train']['prepare_s']} s",
        flush=True,
    )
    return row


def measure_prepared_tfds(name, config, tfds_dir: Path, seconds, npy_row) -> dict:
    """The release pipeline ``name`` again, from its fixture prepared into tfds data in
    ``tfds_dir`` (array_record, read by index like a pod host does)."""
    from experiments import prepare
    from hgrn_jax import tasks
    from hgrn_jax.tasks.base import PreparedTfds

    config = config.copy_and_resolve_references()
    config.data.tfds_dir = str(tfds_dir)
    start = time.perf_counter()
    prepare.prepare(config)
    prepare_s = time.perf_counter() - start
    assert isinstance(tasks.get_task(config), PreparedTfds), name
    row = measure(name.replace(")", ", tfds)"), config, seconds)
    row["tfds_prepare_s"] = round(prepare_s, 3)
    row["vs_npy"] = {
        part: round(row[part]["examples_per_s"] / npy_row[part]["examples_per_s"], 4)
        for part in ("train", "eval")
    }
    print(
        f"{'':36s} tfds / npy: train {row['vs_npy']['train']:.3g}, eval "
        f"{row['vs_npy']['eval']:.3g}; tfds prepare {row['tfds_prepare_s']} s",
        flush=True,
    )
    return row


def _cycle(task, batch):
    while True:
        yield from task.eval_batches("val", 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in cases(Path(tmp), rng):
            rows.append(measure(name, config, args.seconds))
            rows.append(
                measure_prepared_tfds(name, config, Path(tmp) / "tfds", args.seconds, rows[-1])
            )
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=256):
            for name, config in tfds_cases(Path(tmp)):
                rows.append(measure(name, config, args.seconds))
        for name, config in imagenet_cases(Path(tmp)):
            rows.append(measure(name, config, args.seconds))
    path = write_results(
        "input",
        rows,
        {
            "seconds": args.seconds,
            "note": (
                "one process, fixtures / tfds mock data in a temporary folder (page cache warm); "
                "prepare_s = first batch, cache preparation included; tfds rows: the release fixture "
                "prepared into tfds data (array_record) first (tfds_prepare_s), vs_npy = examples/s "
                "over the .npy row's of the same run"
            ),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
