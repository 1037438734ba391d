"""LRA Retrieval: AAN citation pairs from the release's ``tsv_data/new_aan_pairs.*.tsv``.

Each file has no header; a row is ``label, id1, id2, text1, text2`` separated by tabs. Texts may
be wrapped in double quotes with tabs and newlines inside them (CSV quoting: ``""`` is a quote
within a quoted field), which must not split the row. Labels are 0 / 1 (written ``1`` or ``1.0``).
Splits: train = ``.train``, val = ``.eval``, test = ``.test``.

Tokenisation is the reference's (OpenNLPLab/lra ``src/dataloaders/datasets.py``, class ``AAN``:
characters, ``l_max=4000``, ``append_eos=True``, torchtext's default ``min_freq=1``): each document
is its characters (code points) truncated to ``seq_len - 1`` and ``<eos>``; the vocabulary holds
``<pad>``, ``<unk>``, ``<eos>`` and every character of the truncated *training* documents (both
columns), by descending count (:mod:`hgrn_jax.data.vocab`). Prepared once into
``cache_dir/aan-vocab-<hash>/vocab.json`` and ``cache_dir/aan-<hash>/`` (memory-mapped arrays).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hgrn_jax.data import loader, release
from hgrn_jax.data.errors import BadDataReport
from hgrn_jax.data.text_lines import decoded_lines, undecodable
from hgrn_jax.data.vocab import CharEncoder, Vocabulary, char_vocabulary, write_row

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

FILES = {
    "train": "new_aan_pairs.train.tsv",
    "val": "new_aan_pairs.eval.tsv",
    "test": "new_aan_pairs.test.tsv",
}
COLUMNS = ("label", "id1", "id2", "text1", "text2")
NUM_CLASSES = 2
KEYS = ("inputs", "lengths", "inputs2", "lengths2", "labels")


def find_file(lra_dir: str, split: str) -> Path:
    return release.find_release_path(
        lra_dir, f"tsv_data/{FILES[split]}", what=f"the AAN retrieval {split} file"
    )


def parse_rows(path: Path, report: BadDataReport) -> Iterator[tuple[int, str, str]]:
    """(label, text1, text2) of every good row; bad rows go to ``report`` with their line."""

    def bad_bytes(number: int, error: UnicodeDecodeError) -> None:
        report.add(path, number, undecodable(path, number, error).split(": ", 1)[1])

    reader = csv.reader(
        decoded_lines(path, bad_bytes),
        delimiter="\t",
        quotechar='"',
        doublequote=True,
        strict=False,
    )
    line = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            report.add(
                path,
                line,
                f"unreadable row ({error}); the rows after it cannot be read either",
                skippable=False,
            )
            return
        start, line = line, reader.line_num + 1
        if not fields:
            continue
        if len(fields) != len(COLUMNS):
            lines = line - start
            if lines > 1:  # a quote left open took in the lines after it, good rows included
                report.add(
                    path,
                    start,
                    f"expected {len(COLUMNS)} tab-separated fields; got {len(fields)} in one row "
                    f'spanning lines {start}-{line - 1}: a quote (") opened here is not closed '
                    f"before line {line - 1}, and the {lines - 1} line(s) after it, rows that may "
                    "be good, were read into it",
                    skippable=False,
                )
                continue
            report.add(
                path,
                start,
                f"expected {len(COLUMNS)} tab-separated fields "
                f"({', '.join(COLUMNS)}); got {len(fields)}",
            )
            continue
        try:
            label = float(fields[0])
        except ValueError:
            report.add(path, start, f"label {fields[0]!r} is not a number")
            continue
        if label not in (0.0, 1.0):
            report.add(path, start, f"label {fields[0]!r} not in 0..{NUM_CLASSES - 1}")
            continue
        text1, text2 = fields[3], fields[4]
        if not text1.strip() or not text2.strip():
            report.add(path, start, "empty document")
            continue
        yield int(label), text1, text2


def _good_rows(path: Path, skip_bad_rows: bool) -> Iterator[tuple[int, str, str]]:
    """The good rows; bad ones are reported (or, when skipped, warned about) first."""
    report = BadDataReport(str(path))
    count = sum(1 for _ in parse_rows(path, report))
    report.finish(skip_bad_rows)
    if count == 0:
        report.add(path, 0, "no examples", skippable=False)
        report.finish(False)
    return parse_rows(path, BadDataReport(str(path)))


def vocabulary(
    *, lra_dir: str, cache_dir: str, seq_len: int, skip_bad_rows: bool = False
) -> Vocabulary:
    """The character vocabulary of the training documents (both columns) encoded at seq_len."""
    path = find_file(lra_dir, "train")
    key = {
        "dataset": "aan-vocab",
        "files": loader.fingerprint([path.resolve()]),
        "seq_len": seq_len,
        "skip_bad_rows": skip_bad_rows,
    }

    def build(folder: Path) -> None:
        texts = (text for _, *pair in _good_rows(path, skip_bad_rows) for text in pair)
        char_vocabulary(texts, seq_len).save(folder / "vocab.json")

    return Vocabulary.load(loader.prepared(cache_dir, "aan-vocab", key, build) / "vocab.json")


def _build(folder: Path, path: Path, seq_len: int, skip_bad_rows: bool, vocab: Vocabulary) -> None:
    if seq_len < 2:
        raise ValueError(
            f"seq_len must be at least 2 (characters and the end token); got {seq_len}"
        )
    count = sum(1 for _ in _good_rows(path, skip_bad_rows))
    encoder = CharEncoder(vocab)
    ids = [
        loader.writable_memmap(folder / f"data.{key}.npy", vocab.dtype, (count, seq_len))
        for key in ("inputs", "inputs2")
    ]
    lengths = np.zeros((2, count), np.int32)
    labels = np.zeros(count, np.int32)
    progress = loader.Progress(f"{path}: encoding", count, "pairs")
    for i, (label, *texts) in enumerate(parse_rows(path, BadDataReport(str(path)))):
        labels[i] = label
        for j, text in enumerate(texts):
            lengths[j, i] = write_row(ids[j], i, encoder.ids(text, seq_len - 1))
        progress.update(i + 1)
    progress.finish(count)
    for array in ids:
        array.flush()
    del ids
    loader.save_arrays(
        folder, "data", {"lengths": lengths[0], "lengths2": lengths[1], "labels": labels}
    )
    vocab.save(folder / "vocab.json")


def load_split(
    split: str, *, lra_dir: str, cache_dir: str, seq_len: int, skip_bad_rows: bool = False
) -> dict[str, np.ndarray]:
    """``inputs``/``inputs2`` (N, seq_len) uint8 ids (``<eos>`` included), ``lengths``/
    ``lengths2`` (N,) int32, ``labels`` (N,) int32 in {0, 1}."""
    vocab = vocabulary(
        lra_dir=lra_dir, cache_dir=cache_dir, seq_len=seq_len, skip_bad_rows=skip_bad_rows
    )
    path = find_file(lra_dir, split)
    key = {
        "dataset": "aan",
        "files": loader.fingerprint([path.resolve()]),
        "seq_len": seq_len,
        "vocab": vocab.fingerprint,
        "skip_bad_rows": skip_bad_rows,
    }
    folder = loader.prepared(
        cache_dir, "aan", key, lambda f: _build(f, path, seq_len, skip_bad_rows, vocab)
    )
    return loader.load_arrays(folder, "data", KEYS)
