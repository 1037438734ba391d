"""Prepare a config's dataset once, ahead of training (``python -m experiments.prepare``).

Reads the sources the config points at and writes the fixed-shape arrays into
``data.cache_dir`` (the first training run would do the same), so they can be checked, timed,
and copied to every host of a pod before training starts. Bad rows are reported exactly as in
training. Usage, with the same config flags as ``experiments.train``::

    python -m experiments.prepare --config=experiments/configs/lra/retrieval.py \\
        --config.data.lra_dir=LRA_DIR --config.data.cache_dir=CACHE

ListOps, Retrieval, Pathfinder, Path-X and WikiText-103 with ``data.tfds_dir`` set are built as
tfds datasets (array_record) into that folder instead, from ``data.lra_dir`` /
``data.wikitext_dir`` as the manual folder (:mod:`hgrn_jax.data.tfds_builders`); training then
reads them from there. ImageNet is prepared by ``python -m hgrn_jax.data.imagenet``.

User errors (a bad flag or config file, a missing folder or file, malformed data) print one line
naming the file or key and the fix, exit code 2 (as ``experiments.train``); ``--traceback`` shows
the full traceback instead.

The closing line says ``prepared in DIR`` when the run wrote there, ``already prepared in
DIR`` when it found every split there already and wrote nothing (judged by the folder's files,
their sizes and modification times, before and after), and ``nothing to prepare`` for a source
that writes no files (WikiText-103's ``synthetic`` bytes, made in memory as each run starts).
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show full tracebacks instead of one-line error messages."
)
USER_ERRORS = (ValueError, OSError, KeyError, AttributeError)
"""What a user can mend (bad values, missing or malformed data): one line, exit code 2."""
flags.mark_flags_as_required(["config"])


def prepare(config) -> dict[str, int]:
    """Examples per split after preparing every split of ``config``'s dataset."""
    from hgrn_jax import tasks

    tasks.dataset(config)  # a module:factory task has no sources to prepare: one line says so
    if _into_tfds(config):
        tasks.tfds_release(config).prepare(config)
    task = tasks.get_task(config)
    return {split: task.num_examples(split) for split in ("train", "val", "test")}


def _into_tfds(config) -> bool:
    from hgrn_jax import tasks

    return (
        bool(config.data.tfds_dir)
        and config.data.source in ("release", "prepared")
        and tasks.dataset(config).tfds is not None
    )


def _files(folder: str) -> dict[str, tuple[int, int]]:
    """``{path: (size, modification time in ns)}`` of every file under ``folder``."""
    root = Path(folder)
    if not folder or not root.is_dir():
        return {}
    return {
        str(path): (info.st_size, info.st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and (info := path.stat())
    }


def prepare_and_describe(config) -> str:
    """Prepare ``config``'s dataset (:func:`prepare`) and say so in one line: where, how long,
    examples per split, and ``already prepared`` when nothing there was written or changed."""
    where = config.data.tfds_dir if _into_tfds(config) else config.data.cache_dir
    before = _files(where)
    start = time.perf_counter()
    sizes = prepare(config)
    seconds = time.perf_counter() - start
    after = _files(where)
    counts = ", ".join(f"{n} {split}" for split, n in sizes.items())
    if not before and not after:
        return (
            f"{config.task} ({config.data.source}) has nothing to prepare: it writes no files, "
            f"its data are made in memory as each run starts ({seconds:.1f} s here): {counts}"
        )
    done = "already prepared" if before and after == before else "prepared"
    return f"{config.task} ({config.data.source}) {done} in {where} in {seconds:.1f} s: {counts}"


def main(argv) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; options look like --config.key=value")
    cli.check_config_file()
    config = _CONFIG.value
    path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    shape_error = cli.config_shape_error(config, path, ("task", "data", "model"))
    if shape_error:
        cli.fail(shape_error)
    try:
        print(prepare_and_describe(config))
    except USER_ERRORS as error:
        if _TRACEBACK.value:
            raise
        cli.fail(f"{type(error).__name__}: {error} (rerun with --traceback for details)")


if __name__ == "__main__":
    cli.show_warnings_on_one_line()
    app.run(main, flags_parser=cli.parse_flags)
