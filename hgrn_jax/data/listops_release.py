"""The LRA release's ListOps files read row by row, bad rows counted (``data.skip_bad_rows``).

``listops-1000/basic_{train,val,test}.tsv`` is found whether the release is nested or not; rows
are tokenised by :class:`hgrn_jax.data.listops.ListOpsTokenizer` (the reference's tokenisation)
with the vocabulary of the training file's good rows. With a ``cache_dir`` the vocabulary
(``listops-vocab-<hash>/vocab.json``) and each split's ids (``listops-<hash>/``, keyed on the file
and the vocabulary's fingerprint, with a copy of ``vocab.json``) are prepared once. A carriage
return inside a row is a bad row like the others; an old Mac file (rows joined by them) stops.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hgrn_jax.data import listops, loader, release
from hgrn_jax.data.errors import BadDataReport, DatasetMissingError
from hgrn_jax.data.text_lines import decoded_lines, undecodable
from hgrn_jax.data.vocab import Vocabulary


def find_file(lra_dir: str, split: str) -> Path:
    """``basic_{split}.tsv`` under the release's ``listops-1000/`` (or in lra_dir itself)."""
    name = listops.split_filename(split)
    if lra_dir:
        for relative in (f"listops-1000/{name}", name, f"listops/{name}"):
            for root in release.candidate_roots(lra_dir):
                if (root / relative).is_file():
                    return root / relative
    path = release.find_release_path(lra_dir, f"listops-1000/{name}", what=name)
    if not path.is_file():  # found as a folder: reading it was a bare IsADirectoryError
        raise DatasetMissingError(
            f"{path} is a folder, not the release's file {name}; put the file there (unpack "
            "lra_release.gz again)"
        )
    return path


def _unreadable(text: str, error: csv.Error, what: str = "row") -> tuple[str, bool]:
    """Why the csv reader could not split the line ``text``, and whether skipping it mends that.

    The reader ends a row at a carriage return (``\\r``) and fails on whatever follows it in the
    line: a stray one inside a row (skippable), or the line ends of an old Mac file, whose rows
    are then one line (not skippable: skipping it would drop them all)."""
    body = text.rstrip("\r\n")
    if "\r" not in body:
        return f"unreadable {what} ({error})", True
    rows = sum("\t" in piece for piece in body.split("\r"))
    if rows > 1:
        return (
            f"{rows} lines joined into one by carriage returns (\\r, old Mac line endings); "
            "convert them to newlines (tr '\\r' '\\n' < FILE > FIXED)",
            False,
        )
    column = body.index("\r") + 1
    return f"carriage return (\\r) inside the {what} at column {column}; delete it", True


def read_rows(path: Path, report: BadDataReport) -> tuple[list[str], np.ndarray]:
    """Sources and labels (int32, 0-9) of the good rows; bad ones go to ``report``."""
    sources, labels = [], []

    def bad_bytes(line: int, error: UnicodeDecodeError) -> None:
        report.add(path, line, undecodable(path, line, error).split(": ", 1)[1])

    last = [""]  # the line the reader took last: the one it failed on, if it fails

    def lines() -> Iterator[str]:
        for text in decoded_lines(path, bad_bytes):
            last[0] = text
            yield text

    # One reader over the decoded lines: a BOM dropped, bad bytes reported by line.
    reader = csv.reader(lines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader, None)
    except csv.Error as error:
        reason, _ = _unreadable(last[0], error, "header")
        report.add(path, reader.line_num, reason, skippable=False)
        return [], np.zeros(0, np.int32)
    if header is None:
        report.add(path, 1, "empty file (it should start with Source<TAB>Target)", skippable=False)
        return [], np.zeros(0, np.int32)
    if "Source" not in header or "Target" not in header:
        report.add(
            path, 1, f"header {header} must name the columns Source<TAB>Target", skippable=False
        )
        return [], np.zeros(0, np.int32)
    src, tgt = header.index("Source"), header.index("Target")
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:  # not a ValueError: it named no file or line
            reason, skippable = _unreadable(last[0], error)
            report.add(path, reader.line_num, reason, skippable=skippable)
            continue  # QUOTE_NONE: a row is one line, and the reader goes on at the next
        line = reader.line_num
        if not fields:
            continue
        if len(fields) != len(header):
            report.add(
                path, line, f"expected {len(header)} tab-separated fields; got {len(fields)}"
            )
            continue
        value = fields[tgt].strip()
        if not (value.isascii() and value.isdigit() and 0 <= int(value) < listops.NUM_CLASSES):
            report.add(
                path, line, f"label {fields[tgt]!r} is not a class in 0..{listops.NUM_CLASSES - 1}"
            )
            continue
        if not fields[src].strip():
            report.add(path, line, "empty expression")
            continue
        sources.append(fields[src])
        labels.append(int(value))
    return sources, np.array(labels, np.int32)


def _good_rows(path: Path, skip_bad_rows: bool) -> tuple[list[str], np.ndarray]:
    report = BadDataReport(str(path))
    sources, labels = read_rows(path, report)
    report.finish(skip_bad_rows)
    if not sources:
        report.add(path, 0, "no examples", skippable=False)
        report.finish(False)
    return sources, labels


@functools.lru_cache(maxsize=4)
def _fit(path: Path, fingerprint: str, seq_len: int, skip_bad_rows: bool) -> Vocabulary:
    sources, _ = _good_rows(path, skip_bad_rows)
    return listops.ListOpsTokenizer.fit(sources, seq_len).vocabulary


def vocabulary(
    *, lra_dir: str, seq_len: int, skip_bad_rows: bool = False, cache_dir: str = ""
) -> Vocabulary:
    """The vocabulary of ``basic_train.tsv`` (ids of the examples encoded at ``seq_len``)."""
    path = find_file(lra_dir, "train")
    fingerprint = str(loader.fingerprint([path.resolve()]))
    if not cache_dir:
        return _fit(path, fingerprint, seq_len, skip_bad_rows)
    key = {
        "dataset": "listops-vocab",
        "train": fingerprint,
        "seq_len": seq_len,
        "skip_bad_rows": skip_bad_rows,
    }
    folder = loader.prepared(
        cache_dir,
        "listops-vocab",
        key,
        lambda f: _fit(path, fingerprint, seq_len, skip_bad_rows).save(f / "vocab.json"),
    )
    return Vocabulary.load(folder / "vocab.json")


def _encode(
    path: Path, seq_len: int, skip_bad_rows: bool, vocab: Vocabulary
) -> dict[str, np.ndarray]:
    sources, labels = _good_rows(path, skip_bad_rows)
    ids, lengths = listops.ListOpsTokenizer(vocab).encode(sources, seq_len, vocab.dtype)
    return {"inputs": ids, "lengths": lengths, "labels": labels}


def load_split(
    split: str, *, lra_dir: str, seq_len: int, skip_bad_rows: bool = False, cache_dir: str = ""
) -> dict[str, np.ndarray]:
    """``inputs`` (N, seq_len) uint8 ids (end token included), ``lengths``, ``labels``.

    Without ``cache_dir`` everything is computed in memory (the vocabulary once per process)."""
    vocab = vocabulary(
        lra_dir=lra_dir, seq_len=seq_len, skip_bad_rows=skip_bad_rows, cache_dir=cache_dir
    )
    path = find_file(lra_dir, split)
    if not cache_dir:
        return _encode(path, seq_len, skip_bad_rows, vocab)
    key = {
        "dataset": "listops",
        "files": loader.fingerprint([path.resolve()]),
        "seq_len": seq_len,
        "vocab": vocab.fingerprint,
        "skip_bad_rows": skip_bad_rows,
    }

    def build(folder: Path) -> None:
        loader.save_arrays(folder, "data", _encode(path, seq_len, skip_bad_rows, vocab))
        vocab.save(folder / "vocab.json")

    folder = loader.prepared(cache_dir, "listops", key, build)
    return loader.load_arrays(folder, "data", ("inputs", "lengths", "labels"))
