"""Input pipeline throughput on CPU, after (grain) and before (the previous input code), one run.

Measures every real-data pipeline's ``train_batches`` (and ``eval_batches``) at the paper's
sequence lengths and batch sizes on generated fixtures in the release layouts
(``tests/data_fixtures.py`` style), on ``tfds.testing.mock_data`` for IMDB and CIFAR-10, and on
ImageNet prepared by tfds from small archives of 500 x 375 JPEGs with DeiT's augmentations. The
release datasets (ListOps, Retrieval, Pathfinder, Path-X, WikiText-103) are measured from their
``.npy`` caches and from the same fixture prepared into tfds data (rows ``... tfds``).

ImageNet, a scaling curve over worker processes: in the training process on 1 thread, then
``data.workers`` = 1 and 2 grain worker processes, each decoding on one thread (images/s against
workers), and the in-process default of ``data.workers=0``: a thread pool of one thread per CPU.

"after" and "before": the same cases, on the same files, measured by two subprocesses in turn,
case by case: one running this tree, one the code of ``--before`` (default: the last commit before
the input moved to grain) checked out with ``git worktree`` into a temporary folder (its
ImageNet rows: ``data.workers`` 0 = a thread pool in the training process, 2 = a
``ProcessPoolExecutor`` of 2; there are no 1-thread and 1-worker rows before). ``vs_before`` =
after / before examples/s; the machine is shared and noisy: each is measured ``--repeats`` times
(after, before, before, after, ...) and keeps its best, and the eval column (code unchanged)
shows the noise left. ``grain_overhead`` times one batch read through grain's iterator, through
grain's ``MapDataset`` random access, through the pipeline's in-process path and bare.

Writes ``benchmarks/results/input_<platform>.json``.

    python benchmarks/input.py [--seconds 1] [--imagenet-seconds 8] [--repeats 2] [--before REV]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

BEFORE = "cd7c7ea"
"""The last commit whose tasks read training batches with their own numpy iterators."""


# ----------------------------------------------------------------------------- cases


def config_of(spec: dict):
    """The experiment config of a case (``spec``: module, data overrides, top-level overrides)."""
    config = importlib.import_module(f"experiments.configs.{spec['config']}").get_config()
    for key, value in spec.get("data", {}).items():
        config.data[key] = value
    for key, value in spec.get("top", {}).items():
        config[key] = value
    for key, value in spec.get("model", {}).items():
        config.model[key] = value
    return config


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


def release_cases(tmp: Path, rng) -> list[dict]:
    """The release datasets' cases, their files written under ``tmp``."""
    import data_fixtures as fx

    from hgrn_jax.data import listops

    lra, cache = tmp / "lra_release", str(tmp / "cache")
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
    write_aan(lra, 256, 4500, rng)
    fx.write_pathfinder(lra, 32, count=2560)
    fx.write_pathfinder(lra, 128, count=200)
    wiki = fx.write_wikitext(tmp / "wikitext", repeats=2000)
    tok = fx.write_bpe_tokenizer(tmp / "tokenizer.json")
    lra_data = {"lra_dir": str(tmp), "cache_dir": cache}
    return [
        {"name": "listops (release, 2048)", "config": "lra.listops", "data": lra_data},
        {"name": "retrieval (AAN, 2 x 4000)", "config": "lra.retrieval", "data": lra_data},
        {"name": "pathfinder (32 x 32)", "config": "lra.pathfinder", "data": lra_data},
        {"name": "pathx (128 x 128)", "config": "lra.pathx", "data": lra_data},
        {
            "name": "wikitext103 (BPE, 512)",
            "config": "lm.wikitext103",
            "data": {"wikitext_dir": str(wiki), "tokenizer_path": str(tok), "cache_dir": cache},
            "top": {"batch_size": 16},
        },
    ]


def tfds_variant(spec: dict, tfds_dir: Path) -> dict:
    """The release case read from its fixture prepared into tfds data (array_record)."""
    return {
        **spec,
        "name": spec["name"].replace(")", ", tfds)"),
        "data": {**spec["data"], "tfds_dir": str(tfds_dir)},
        "tfds_of": spec["name"],
    }


def mock_cases(tmp: Path) -> list[dict]:
    cache = {"cache_dir": str(tmp / "cache")}
    return [
        {"name": "text (IMDB mock, 4096)", "config": "lra.text", "data": cache, "mock": 256},
        {
            "name": "image (CIFAR-10 mock, crop+flip)",
            "config": "lra.image",
            "data": cache,
            "mock": 256,
        },
    ]


def imagenet_cases(tmp: Path, train_seconds: float) -> list[dict]:
    """ImageNet prepared by tfds from archives of 500 x 375 JPEGs (the typical ImageNet size);
    timed for ``train_seconds`` (a batch of 32 takes about a second on 2 cores). Rows: (name,
    ``data.workers``, threads of the training process when it decodes (0: one per CPU), whether
    the old code has the same row)."""
    rows = (
        ("in process, 1 thread", 0, 1, False),
        ("1 worker process", 1, 0, False),
        ("2 worker processes", 2, 0, True),
        ("in process, 1 thread per CPU", 0, 0, True),
    )
    return [
        {
            "name": f"imagenet (JPEG, DeiT aug, {name})",
            "config": "imagenet.tiny",
            "data": {"tfds_dir": str(tmp / "imagenet"), "workers": workers, "image_size": 224},
            "model": {"num_classes": 1000},
            "top": {"batch_size": 32, "eval_batch_size": 32},
            "task_attributes": {"in_process_threads": threads} if threads else {},
            "workers": workers,
            "threads": threads,
            "compare": compare,
            "train_seconds": train_seconds,
        }
        for name, workers, threads, compare in rows
    ]


def write_imagenet(tmp: Path) -> None:
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
    imagenet.prepare(str(tmp / "imagenet"), str(tmp / "manual"))


# ----------------------------------------------------------------------------- measuring


# The measuring process: run with one tree's modules first on sys.path (this one, or the old
# one); reads one case (JSON) per line on stdin and answers each with one JSON row. It uses only
# what both trees have (the task registry and the experiment configs), and `config_of` above
# (its source is put before this text).
_DRIVER = r"""
import contextlib, importlib, json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from hgrn_jax import tasks
seconds = float(sys.argv[2])


def throughput(make, batch_size, seconds):
    start = time.perf_counter()
    iterator = make()
    next(iterator)
    prepare = time.perf_counter() - start
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    for stop in ("close",):  # grain iterators: stop their worker processes; generators too
        getattr(iterator, stop, lambda: None)()
    return {"prepare_s": round(prepare, 3), "batches": count,
            "examples_per_s": round(count * batch_size / elapsed, 1),
            "examples_per_cpu_s": round(count * batch_size / max(cpu, 1e-9), 1)}


def cycle(task):
    while True:
        yield from task.eval_batches("val", 0, 1)


print("ready", flush=True)
for line in sys.stdin:
    spec = json.loads(line)
    mock = contextlib.nullcontext()
    if spec.get("mock"):
        import tensorflow_datasets as tfds
        mock = tfds.testing.mock_data(num_examples=spec["mock"])
    with mock:
        config = config_of(spec)
        task = tasks.get_task(config)
        for name, value in spec.get("task_attributes", {}).items():
            setattr(task, name, value)
        batch = config.eval_batch_size or config.batch_size
        train_seconds = spec.get("train_seconds", seconds)
        row = {
            "pipeline": spec["name"],
            "task": config.task,
            "batch_size": config.batch_size,
            "seq_len": config.data.seq_len,
            "train": throughput(lambda: iter(task.train_batches(0, 0, 1)), config.batch_size,
                                train_seconds),
            "eval": throughput(lambda: iter(cycle(task)), batch, seconds),
        }
    print("row " + json.dumps(row), flush=True)
"""


class Measurer:
    """A process measuring cases with the code of git revision ``rev`` (a temporary ``git
    worktree``) or, for ``rev=None``, of this tree. The "after" and "before" rows are taken by
    two such processes in turn, case by case, so that both see the same machine load."""

    def __init__(self, rev: str | None, seconds: float):
        self.rev, self.seconds = rev, seconds

    def __enter__(self) -> Measurer:
        self._folder = tempfile.TemporaryDirectory()
        self.tree = REPO
        if self.rev is not None:
            self.tree = Path(self._folder.name) / "before"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(self.tree), self.rev],
                check=True,
                capture_output=True,
            )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                inspect.getsource(config_of) + _DRIVER,
                str(self.tree),
                str(self.seconds),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=self.tree,
            env={**os.environ, "PYTHONPATH": f"{self.tree}:{self.tree / 'tests'}"},
        )
        self._answer("ready")
        return self

    def _answer(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"the measuring process of {self.rev or 'this tree'} stopped")

    def measure(self, spec: dict) -> dict:
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        return json.loads(self._answer("row "))

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)
        if self.rev is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.tree)],
                capture_output=True,
            )
        self._folder.cleanup()


def grain_overhead(repeats: int = 5, batches: int = 300) -> list[dict]:
    """Microseconds per batch (one process, interleaved, best of ``repeats``) of the same
    memory-mapped-like read: through grain's iterator (``to_iter_dataset``, the in-process path
    before), by grain's ``MapDataset`` random access (``ds[step]``), through the pipeline's
    in-process path (:meth:`TrainLoader.batch`, what ``data.workers=0`` runs) and bare."""
    import grain

    from hgrn_jax.data import grain_pipeline, loader

    out = []
    for rows, width, batch in ((20_000, 513, 16), (4_096, 2048, 128)):
        # ones, not zeros: untouched calloc pages would time page faults on the first pass
        source = grain_pipeline.ArraySource({"ids": np.ones((rows, width), np.uint16)})
        pipeline = grain_pipeline.train_loader(source, seed=0, batch_size=batch)
        mapped = grain.MapDataset.range(0, 2**62).map(pipeline._batch)

        def through_iterator():
            iterator = iter(pipeline.dataset(0))
            next(iterator)
            return lambda: next(iterator)

        def random_access():
            steps = iter(range(2**62))
            return lambda: mapped[next(steps)]

        def in_process():
            iterator = pipeline.iterator(0)
            next(iterator)
            return lambda: next(iterator)

        def bare():
            steps = iter(range(2**62))
            return lambda: source.read(loader.train_rows(0, next(steps), rows, batch))

        ways = {
            "grain_iterator_us": through_iterator,
            "grain_random_access_us": random_access,
            "pipeline_us": in_process,
            "bare_us": bare,
        }
        times = {key: [] for key in ways}
        for _ in range(repeats):
            for key, setup in ways.items():
                read = setup()
                start = time.perf_counter()
                for _ in range(batches):
                    read()
                times[key].append((time.perf_counter() - start) / batches)
        row = {"batch": f"{batch} x {width} uint16"}
        row.update({key: round(1e6 * min(value), 1) for key, value in times.items()})
        print(
            f"per batch of {row['batch']}: grain iterator {row['grain_iterator_us']} us, "
            f"grain random access {row['grain_random_access_us']} us, pipeline (in process) "
            f"{row['pipeline_us']} us, bare read {row['bare_us']} us",
            flush=True,
        )
        out.append(row)
    return out


def prepare_caches(specs: list[dict]) -> None:
    """Prepare every case's ``.npy`` caches here, before measuring: a measuring process that
    prepared a cache itself ran its batches about 1.5-2x slower afterwards (measured on the
    CIFAR-10 mock case, in CPU time, whichever code prepared it), which would bias the ratios
    against the code measured first."""
    from hgrn_jax import tasks

    for spec in specs:
        if spec["config"].startswith("imagenet"):
            continue  # read from the tfds records: nothing to prepare
        mock = contextlib.nullcontext()
        if spec.get("mock"):
            import tensorflow_datasets as tfds

            mock = tfds.testing.mock_data(num_examples=spec["mock"])
        with mock:
            task = tasks.get_task(config_of(spec))
            for split in ("train", "val", "test"):
                task.examples(split)


def best(rows: list[dict]) -> dict:
    """The first row, with each part's highest examples/s of all (the least disturbed run)."""
    out = dict(rows[0])
    for part in ("train", "eval"):
        out[part] = max((r[part] for r in rows), key=lambda p: p["examples_per_s"])
    out["repeats"] = len(rows)
    return out


def print_row(row: dict) -> None:
    before = row.get("before")
    b = (
        f"  before train {before['train']['examples_per_s']:>9} eval "
        f"{before['eval']['examples_per_s']:>9}  after/before train {row['vs_before']['train']:.3g}"
        f" eval {row['vs_before']['eval']:.3g} (train per CPU second "
        f"{row['train']['examples_per_cpu_s'] / before['train']['examples_per_cpu_s']:.3g})"
        if before
        else ""
    )
    print(
        f"{row['pipeline']:40s} train {row['train']['examples_per_s']:>9} eval "
        f"{row['eval']['examples_per_s']:>9} ex/s{b}",
        flush=True,
    )


def main() -> None:
    from benchmarks.common import write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--before", default=BEFORE, help="git revision of the old code, or none")
    parser.add_argument("--imagenet-seconds", type=float, default=8.0)
    parser.add_argument(
        "--repeats", type=int, default=2, help="measurements per case and code (best kept)"
    )
    parser.add_argument("--imagenet-only", action="store_true", help="only the ImageNet rows")
    parser.add_argument(
        "--only",
        nargs="*",
        default=(),
        help="only the cases whose name holds one of these (a check: writes no results)",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, specs = [], []
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.imagenet_only:
            from experiments import prepare

            for spec in release_cases(tmp, rng):
                tfds_spec = tfds_variant(spec, tmp / "tfds")
                start = time.perf_counter()
                prepare.prepare(config_of(tfds_spec))
                tfds_spec["tfds_prepare_s"] = round(time.perf_counter() - start, 3)
                specs += [spec, tfds_spec]
            specs += mock_cases(tmp)
        if not args.only or any("imagenet" in part for part in args.only):
            write_imagenet(tmp)
            specs += imagenet_cases(tmp, args.imagenet_seconds)
        if args.only:
            specs = [spec for spec in specs if any(part in spec["name"] for part in args.only)]
        prepare_caches(specs)
        with contextlib.ExitStack() as stack:
            after = stack.enter_context(Measurer(None, args.seconds))
            before = None
            if args.before != "none":
                before = stack.enter_context(Measurer(args.before, args.seconds))
            for measurer in (after, before):  # warm-up (imports, first reads), discarded
                if measurer is not None and specs:
                    measurer.measure({**specs[0], "train_seconds": 0.2})
            for spec in specs:
                both = before is not None and spec.get("compare", True)
                # after, before, before, after, ...: each keeps its best of `repeats`
                taken: dict[int, list[dict]] = {id(after): [], id(before): []}
                for repeat in range(args.repeats):
                    pair = [after, before] if repeat % 2 == 0 else [before, after]
                    for measurer in pair if both else [after]:
                        taken[id(measurer)].append(measurer.measure(spec))
                row = best(taken[id(after)])
                for key in ("tfds_prepare_s", "workers", "threads"):
                    if key in spec:
                        row[key] = spec[key]
                if both:
                    row["before"] = best(taken[id(before)])
                    row["vs_before"] = {
                        part: round(
                            row[part]["examples_per_s"]
                            / max(row["before"][part]["examples_per_s"], 1e-9),
                            3,
                        )
                        for part in ("train", "eval")
                    }
                row["load_average"] = round(os.getloadavg()[0], 2)
                rows.append(row)
                print_row(row)
    overhead = grain_overhead()
    if args.only:
        print("--only: a partial run, results not written")
        return
    path = write_results(
        "input",
        rows,
        {
            "grain_overhead": overhead,
            "seconds": args.seconds,
            "imagenet_seconds": args.imagenet_seconds,
            "repeats": args.repeats,
            "before": args.before,
            "load_average_at_start": load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": (
                "one process; fixtures / tfds mock data in a temporary folder (page cache warm); "
                "prepare_s = time to the first batch; 'before' = the same cases measured by the "
                f"code of {args.before} (git worktree, subprocess) right after, vs_before = "
                "after / before examples/s; imagenet 'N worker processes' = data.workers "
                "(before: 2 = a ProcessPoolExecutor; after: grain worker processes, one thread "
                "each), 'in process, 1 thread per CPU' = data.workers=0 (a thread pool, before "
                "and after); load_average = the 1-minute load average after the row (this "
                "benchmark's own processes included: 1 to 3)"
            ),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
