"""LRA Retrieval: AAN citation pairs from the release's ``tsv_data/new_aan_pairs.*.tsv``.

Each file has no header; a row is ``label, id1, id2, text1, text2`` separated by tabs. Texts may
be wrapped in double quotes with tabs and newlines inside them (CSV quoting: ``""`` is a quote
within a quoted field), which must not split the row. Labels are 0 / 1 (written ``1`` or ``1.0``).
A quote left open stops the run, naming the line it opened on: one whose text takes in lines
that start like rows, or one the file ends inside. A carriage return outside quotes (which the
csv reader cannot read past) makes its row a bad row (``data.skip_bad_rows``); an old Mac file,
its rows joined by them, stops the run.
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
import re
import sys
from collections.abc import Callable, Iterator
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


ROW_START = re.compile(r"[01](\.0)?\t[^\t]*\t[^\t]*\t")
"""The start of a row (label, id1, id2, then text1): a line inside a quoted text that starts so
was a row of its own, read into the text by a quote left open."""


class _RowLines:
    """The file's lines as the csv reader takes them, with each row's lines and its quotes.

    The reader (tab-separated, ``"`` quotes, ``""`` a quote inside them, ``strict=False``) asks for
    another line within a row only while a quoted field is open, so every line of :attr:`row`
    after the first starts inside quotes. Each line is scanned as the reader parses it: where the
    quote still open at its end was opened (:attr:`open_since`), and the first carriage return
    outside quotes that does not end the line (:attr:`bare_cr`, which the reader fails on).
    """

    def __init__(
        self, path: Path, on_undecodable: Callable[[int, UnicodeDecodeError], None]
    ) -> None:
        self._lines = decoded_lines(path, on_undecodable)
        self.row: list[tuple[int, str, int]] = []  # (line, text, open_since at its start)
        self.open_since = 0  # the line where the quote open at the last line's end opened; 0: none
        self.bare_cr: tuple[int, int] | None = None  # (line, column)
        self._number = 0

    def next_row(self) -> None:
        """Start a new row (the reader returned one, or failed on a line)."""
        self.row, self.open_since, self.bare_cr = [], 0, None

    def __iter__(self) -> Iterator[str]:
        for text in self._lines:
            self._number += 1
            self.row.append((self._number, text, self.open_since))
            self._scan(text)
            yield text

    def _scan(self, text: str) -> None:
        # The csv reader's states; a text outside quotes and one inside are skipped at C speed.
        start, field, quoted, quote = range(4)
        state, opened, at, size = (quoted if self.open_since else start), 0, 0, len(text)
        cr, last = "\r" in text, size - text.endswith("\n")
        while at < size:
            if state == quoted:
                at = text.find('"', at) + 1
                if not at:
                    break
                state = quote  # closed, or the first of a doubled quote
                continue
            char = text[at]
            if char == '"' and state != field:  # a quote opened, or the second of a doubled one
                state, opened, at = quoted, (self._number if state == start else opened), at + 1
            elif char == "\t":
                state, at = start, at + 1
            elif char in "\r\n":  # the row ends here; anything but line ends after it is an error
                if text[at + 1 :].strip("\r\n") and self.bare_cr is None:
                    self.bare_cr = (self._number, at + 1)
                break
            else:  # a text outside quotes, up to the next tab or line end
                ends = [
                    i for i in (text.find("\t", at), text.find("\r", at) if cr else -1) if i >= 0
                ]
                state, at = field, min(ends, default=last)
        if state != quoted:
            self.open_since = 0
        elif opened:
            self.open_since = opened


def _quote_took_rows(taken: list[tuple[int, int]], end: int) -> tuple[int, str]:
    """The line and message of a row whose quoted text took in lines that look like rows
    (``taken``: their line numbers, each with where its quote was opened); not skippable."""
    first, opened = taken[0]
    return (
        opened,
        f'a quote (") opened here is still open at line {first}, which looks like a row of its '
        f"own: lines {first}-{end} were read into this row's text ({len(taken)} of them look "
        "like rows); close the quote where its text ends (a quote inside a quoted text is "
        'doubled: "say ""hi""")',
    )


def _carriage_return(lines: _RowLines, start: int) -> tuple[int, str, bool]:
    """The line and message (and ``skippable``) of a row the reader failed on at a carriage
    return outside quotes: a stray one (skippable), or an old Mac file's line ends (not: the
    line holds several rows)."""
    number, column = lines.bare_cr
    text = lines.row[-1][1].rstrip("\r\n")
    rows = sum(1 for piece in text.split("\r") if ROW_START.match(piece))
    if rows > 1:
        return (
            number,
            f"{rows} rows joined into one line by carriage returns (\\r, old Mac line endings); "
            "convert them to newlines (tr '\\r' '\\n' < FILE > FIXED)",
            False,
        )
    where = f"column {column}" if number == start else f"line {number}, column {column}"
    return (
        start,
        f"carriage return (\\r) outside quotes at {where}, which ends the row there; delete "
        "it, or quote the text that holds it",
        True,
    )


def parse_rows(path: Path, report: BadDataReport) -> Iterator[tuple[int, str, str]]:
    """(label, text1, text2) of every good row; bad rows go to ``report`` with their line."""

    def bad_bytes(number: int, error: UnicodeDecodeError) -> None:
        report.add(path, number, undecodable(path, number, error).split(": ", 1)[1])

    lines = _RowLines(path, bad_bytes)
    reader = csv.reader(lines, delimiter="\t", quotechar='"', doublequote=True, strict=False)
    while True:
        lines.next_row()
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            fields = error
        if not lines.row:
            return
        start, end = lines.row[0][0], lines.row[-1][0]
        # Lines inside a quoted text that look like rows: a quote left open took them in.
        taken = [(n, since or start) for n, text, since in lines.row[1:] if ROW_START.match(text)]
        if isinstance(fields, csv.Error):
            if taken:
                report.add(path, *_quote_took_rows(taken, end), skippable=False)
            elif lines.bare_cr is None:
                report.add(path, start, f"unreadable row ({fields})")
            else:
                line, reason, skippable = _carriage_return(lines, start)
                report.add(path, line, reason, skippable=skippable)
            continue
        if not fields:
            continue
        if len(fields) != len(COLUMNS) and end > start:
            # a quote left open took in the lines after it, good rows included
            opened = taken[0][1] if taken else start
            where = "here" if opened == start else f"on line {opened}"
            report.add(
                path,
                start,
                f"expected {len(COLUMNS)} tab-separated fields; got {len(fields)} in one row "
                f'spanning lines {start}-{end}: a quote (") opened {where} is not closed '
                f"before line {end}, and the {end - opened} line(s) after it, rows that may "
                "be good, were read into it",
                skippable=False,
            )
            continue
        if taken:  # the row after them ended in a quoted text: 5 fields, but rows lost
            report.add(path, *_quote_took_rows(taken, end), skippable=False)
            continue
        if lines.open_since:  # the reader returns a row with a quote open only at the end
            opened = lines.open_since
            text = f" (lines {opened}-{end} are its text)" if end > opened else ""
            report.add(
                path,
                opened,
                f'a quote (") opened here is never closed: the file ends inside it{text}; close '
                "the quote where its text ends, or unpack the release again if the file was cut "
                "short",
                skippable=False,
            )
            continue
        if len(fields) != len(COLUMNS):
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
