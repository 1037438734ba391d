"""UTF-8 text files read line by line: a byte-order mark dropped, bad bytes named by line.

Every reader of the LRA release's text files (ListOps, AAN) goes through :func:`decoded_lines`,
so a BOM, a line that is not UTF-8 or a binary file give the same messages everywhere.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from pathlib import Path

from hgrn_jax.data.errors import BadDataError


class BinaryFileError(BadDataError):
    """A data file that is not text at all (NUL bytes): no row of it can be read."""


def undecodable(path: str | Path, line: int, error: UnicodeDecodeError) -> str:
    """The message for a line that is not UTF-8."""
    return (
        f"{path}:{line}: not valid UTF-8 ({error.reason}, byte 0x{error.object[error.start]:02x} "
        f"at column {error.start + 1})"
    )


def decoded_lines(
    path: str | Path, on_undecodable: Callable[[int, UnicodeDecodeError], None]
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
                    "download?)"
                )
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as error:
                on_undecodable(number, error)
                yield ""
