"""Reading the tab-separated files of the Long Range Arena release.

The LRA release ships ListOps as ``basic_{train,val,test}.tsv`` with a header row
``Source<TAB>Target`` (the expression, then its value 0-9), and Retrieval (AAN) as headerless
``new_aan_pairs.{train,eval,test}.tsv`` rows ``label, id1, id2, text1, text2``. Our ListOps
generator writes the same layout, so generated and released data go through :func:`read_tsv`.
"""

from __future__ import annotations

import codecs
import csv
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, Sequence

# Retrieval documents are long; the csv module's default field limit (128 KiB) is too small.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class MalformedRowError(ValueError):
    """A row of a TSV file that does not have the expected columns or values."""


class BinaryFileError(MalformedRowError):
    """A data file that is not text at all (NUL bytes): no row of it can be read."""


def undecodable(path: str | Path, line: int, error: UnicodeDecodeError) -> str:
    """The message for a line that is not UTF-8."""
    return (f"{path}:{line}: not valid UTF-8 ({error.reason}, byte 0x{error.object[error.start]:02x} "
            f"at column {error.start + 1})")


def decoded_lines(path: str | Path, on_undecodable: Callable[[int, UnicodeDecodeError], None]
                  ) -> Iterator[str]:
    """The lines of a UTF-8 text file (newlines kept, a leading byte-order mark dropped).

    A line that is not UTF-8 is passed to ``on_undecodable(line_number, error)`` (which may
    raise) and yielded as ``""`` so that later line numbers stay right; a file holding NUL bytes
    raises :class:`BinaryFileError` naming it.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise BinaryFileError(
                    f"{path}:{number}: binary data (NUL bytes), not UTF-8 text; point the config "
                    "at the dataset's text file (is this one compressed, or damaged by a failed "
                    "download?)")
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as error:
                on_undecodable(number, error)
                yield ""


class TsvRow(NamedTuple):
    """One data row: its 1-based line number in the file and the picked fields."""

    line: int
    fields: tuple[str, ...]


def find_file(folders: Sequence[str | Path], name: str, *, what: str, config_key: str) -> Path:
    """The first ``folder/name`` that exists, or a FileNotFoundError naming what to put where.

    Args:
      folders: candidate folders, in order of preference.
      name: the file name inside them.
      what: a human description of the data ("the LRA ListOps release").
      config_key: the config key the user sets to point at the data (``data.lra_dir``).
    """
    tried = [Path(folder) / name for folder in folders]
    for path in tried:
        if path.is_file():
            return path
    listing = ", ".join(str(p) for p in tried) or "(no folder configured)"
    raise FileNotFoundError(
        f"{name} not found (looked for {listing}): put {what} there or set "
        f"--config.{config_key}=FOLDER to the folder that holds {name}")


def read_tsv(path: str | Path, columns: Sequence[str], *, header: bool = True) -> list[TsvRow]:
    """All data rows of a TSV file, fields picked in ``columns`` order.

    With ``header=True`` the first row must name the columns (any order, extra columns allowed:
    the named ones are picked). Without a header, every row must have exactly ``len(columns)``
    fields. A UTF-8 byte-order mark is ignored. Raises :class:`MalformedRowError` naming the file
    and line of the first bad row or of bytes that are not UTF-8 (:class:`BinaryFileError` for a
    binary file), FileNotFoundError if the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    rows: list[TsvRow] = []

    def fail(line: int, error: UnicodeDecodeError) -> None:
        raise MalformedRowError(undecodable(path, line, error) + "; re-save the file as UTF-8")

    reader = csv.reader(decoded_lines(path, fail), delimiter="\t", quoting=csv.QUOTE_NONE)
    if header:
        names = next(reader, None)
        if names is None:
            raise MalformedRowError(f"{path}:1: empty file; expected a header row "
                                    f"{'<TAB>'.join(columns)}")
        missing = [c for c in columns if c not in names]
        if missing:
            raise MalformedRowError(
                f"{path}:1: header {names} lacks column(s) {missing}; expected "
                f"{'<TAB>'.join(columns)}")
        picks = [names.index(c) for c in columns]
        width = len(names)
    else:
        picks = list(range(len(columns)))
        width = len(columns)
    for fields in reader:
        if not fields:  # a blank line, e.g. the file's trailing newline twice
            continue
        if len(fields) != width:
            expected = ", ".join(names if header else columns)
            raise MalformedRowError(
                f"{path}:{reader.line_num}: expected {width} tab-separated fields "
                f"({expected}); got {len(fields)}")
        rows.append(TsvRow(reader.line_num, tuple(fields[i] for i in picks)))
    return rows


def parse_int_label(value: str, path: str | Path, line: int, num_classes: int) -> int:
    """``value`` as an integer class in [0, num_classes), or a MalformedRowError at path:line."""
    try:
        label = int(float(value))
    except ValueError:
        raise MalformedRowError(f"{path}:{line}: label {value!r} is not an integer") from None
    if not 0 <= label < num_classes or float(value) != label:
        raise MalformedRowError(
            f"{path}:{line}: label {value!r} is not an integer class in 0..{num_classes - 1}")
    return label
