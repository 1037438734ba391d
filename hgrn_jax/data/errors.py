"""Errors of the real-data pipelines: a missing dataset, and bad rows counted with file and line."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

MAX_LISTED = 10


class DatasetMissingError(FileNotFoundError):
    """A dataset is not where the config points; the message says what to put where."""


class BadDataError(ValueError):
    """Malformed rows, unreadable images or labels out of range were found (and not skipped)."""


class SkippedExamplesWarning(UserWarning):
    """Bad examples were left out of the data (``data.skip_bad_rows=True``); the message lists
    them with file and line."""


@dataclasses.dataclass
class BadDataReport:
    """Collects bad examples of one dataset: ``(file, line, reason)``, line 0 meaning none.

    ``finish(skip)`` raises :class:`BadDataError` listing them unless ``skip`` is true, in which
    case it warns with the same list and the examples stay out of the data. Problems added with
    ``skippable=False`` (a bad header, a file with no examples left) make the data unusable
    whatever ``skip`` says, so for them ``data.skip_bad_rows`` is neither applied nor suggested.
    """

    dataset: str
    problems: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    fatal: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)

    def add(self, file: str | Path, line: int, reason: str, *, skippable: bool = True) -> None:
        self.problems.append((str(file), int(line), reason))
        if not skippable:
            self.fatal.append(self.problems[-1])

    def __len__(self) -> int:
        return len(self.problems)

    def message(self) -> str:
        listed = [
            f"  {file}:{line}: {reason}" if line else f"  {file}: {reason}"
            for file, line, reason in self.problems[:MAX_LISTED]
        ]
        more = len(self.problems) - MAX_LISTED
        if more > 0:
            listed.append(f"  ... and {more} more")
        return f"{len(self.problems)} bad example(s) in {self.dataset}:\n" + "\n".join(listed)

    def finish(self, skip: bool) -> None:
        if not self.problems:
            return
        if self.fatal:
            listed = self.fatal[0] in self.problems[:MAX_LISTED]
            raise BadDataError(
                self.message()
                + "\nfix the file: skipping rows cannot help here"
                + ("" if listed else f" ({self.fatal[0][2]})")
            )
        if not skip:
            raise BadDataError(
                self.message() + "\nfix the data, or skip these examples with "
                "--config.data.skip_bad_rows=True"
            )
        warnings.warn(
            self.message() + "\n(skipped: data.skip_bad_rows=True)",
            SkippedExamplesWarning,
            stacklevel=2,
        )
