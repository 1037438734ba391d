"""Deterministic, resumable, per-process loading of prepared arrays.

Real datasets are prepared once into fixed-shape ``.npy`` arrays under ``data.cache_dir`` (token
ids, pixels, labels) and opened memory-mapped, so every process of a multi-host run reads only
the rows of its own shard and never re-tokenises or re-decodes. ImageNet, too large for this,
reads records by index from tfds's random-access data source instead.

The order (every task of ``hgrn_jax.tasks`` uses it): epoch ``e`` visits the training rows in
``default_rng((seed, e)).permutation(n)``; step ``s`` takes global batch ``s mod (n // B)`` of
epoch ``s // (n // B)``, and process ``p`` of ``P`` takes its ``B / P`` rows of it. With
repeated augmentation (``repeats`` k > 1, ImageNet's) each row of the permutation comes k times
in a row and an epoch is still ``n // B`` batches: the first ``(n // B) * B`` entries of that
stream, about ``n / k`` distinct rows. The loader's
whole position is therefore the step, which the training loop saves in every checkpoint:
``train_batches(start_step=s)`` after a restart yields exactly what an uninterrupted run yields.
Random augmentations draw from :func:`batch_rng` ``(seed, step)`` for the *global* batch and keep
the process's slice, so they, too, are exact on resumption and independent of the process count.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hgrn_jax.data.disk_space import describe_free_space
from hgrn_jax.data.errors import BadDataError, SkippedExamplesWarning

DONE = "DONE"
"""In a prepared folder, written last: JSON ``{"sizes": {file: bytes}}`` of every other file
(empty in folders prepared before sizes were recorded: those are opened unchecked)."""
SKIPPED = "skipped.txt"
"""In a prepared folder: the bad examples its build left out (``data.skip_bad_rows=True``)."""
PROGRESS_EVERY_S = 10.0


# ----------------------------------------------------------------------------- order


def process_slice(
    batch_size: int, process_index: int, process_count: int, config_key: str = "batch_size"
) -> slice:
    """The rows ``[p * B / P, (p + 1) * B / P)`` of a global batch that process ``p`` owns.

    ``config_key`` names the setting to change in the error for a batch that does not split."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"{config_key} {batch_size} must be a positive multiple of the number "
            f"of processes ({process_count}); set --config.{config_key}"
        )
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def train_rows(
    seed: int,
    step: int,
    num_examples: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    repeats: int = 1,
) -> np.ndarray:
    """Indices (B / P,) of the training examples process ``p`` reads at ``step``.

    ``repeats`` k: the epoch's permutation with each index k times in a row
    (``[a, a, a, b, b, b, ...]`` for 3), cut to ``n // B`` batches: DeiT's repeated augmentation
    (its ``RASampler``, whose epoch of ``n // 256 * 256`` entries gives the same batches when
    ``B`` is a multiple of 256)."""
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise ValueError(f"{num_examples} training examples are fewer than batch size {batch_size}")
    if repeats < 1:
        raise ValueError(f"repeats {repeats} must be >= 1 (1: each example once per epoch)")
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(seed, epoch, num_examples)
    positions = np.arange(k * batch_size, (k + 1) * batch_size)
    return order[positions[process_slice(batch_size, process_index, process_count)] // repeats]


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The permutation (num_examples,) of the training examples in ``epoch`` (cached: every
    step of an epoch reads the same one)."""
    order = np.random.default_rng((seed, epoch)).permutation(num_examples)
    order.flags.writeable = False
    return order


def eval_rows(
    num_examples: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    config_key: str = "batch_size",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per evaluation batch: (indices (B / P,), valid (B / P,) bool); padding rows repeat row 0."""
    sl = process_slice(batch_size, process_index, process_count, config_key)
    out = []
    for start in range(0, num_examples, batch_size):
        rows = np.arange(start, start + batch_size)[sl]
        valid = rows < num_examples
        out.append((np.where(valid, rows, 0), valid))
    return out


def batch_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of a global training batch's augmentations: a pure function of its args."""
    return np.random.default_rng((int(seed), int(step), int(stream), 0x5EED))


# ----------------------------------------------------------------------------- caches


def fingerprint(paths: list[Path] | tuple[Path, ...]) -> list[list[Any]]:
    """(name, size, mtime) of files: a prepared cache is rebuilt when its sources change."""
    out = []
    for path in paths:
        stat = Path(path).stat()
        out.append([str(path), stat.st_size, int(stat.st_mtime)])
    return out


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (tempfile's are 0600/0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def file_in_the_way(path: str | Path) -> Path | None:
    """What stops ``path`` from being (or becoming) a folder: the path itself, or the nearest
    of its parents that exists, when that is not a folder; else None."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    return existing if existing is not None and not existing.is_dir() else None


def check_cache_dir(cache_dir: str | Path) -> None:
    """Raise a ValueError naming ``config.data.cache_dir`` when it is a file or lies below one
    (the prepared data's folders are made in it: the OSError named only a subfolder)."""
    path = Path(cache_dir)
    existing = file_in_the_way(path)
    if existing is None:
        return
    where = "is a file" if existing == path else f"lies in {existing}, which is a file"
    raise ValueError(
        f"config.data.cache_dir={str(cache_dir)!r} {where}, not a folder; set "
        "--config.data.cache_dir to a folder (a new or an existing one) for the prepared data"
    )


OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


def is_out_of_space(error: BaseException) -> bool:
    """Whether ``error`` is a write that failed for lack of space or quota: an OSError with
    ENOSPC / EDQUOT; TensorStore's error for one (Orbax writes arrays through TensorStore,
    whose failures reach Python as a ValueError ending ``[os_error_code='28']``); tfds's
    writer's RuntimeError quoting the OSError; numpy's short write (``np.save`` of a large
    array: an OSError without an errno, ``N requested and M written``)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in OUT_OF_SPACE_ERRNOS
    return says_out_of_space(str(error))


def says_out_of_space(text: str) -> bool:
    """Whether an error's ``text`` (or a log message quoting one) is a write that failed for
    lack of space: TensorStore's ``[os_error_code='28']``, the OS's message, numpy's short
    write (see :func:`is_out_of_space`)."""
    code = TENSORSTORE_OS_ERROR.search(text)
    if code is not None:
        return int(code.group(1)) in OUT_OF_SPACE_ERRNOS
    return os.strerror(errno.ENOSPC) in text or ("requested and" in text and "written" in text)


_SHOWN_AS: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "cache folder shown as", default=None
)


@contextlib.contextmanager
def cache_shown_as(folder: str | Path, key: str) -> Iterator[None]:
    """Within this block, a cache folder's errors (:func:`naming_the_cache_dir`) name
    ``config.data.<key>=folder`` instead: a scratch cache inside the tfds data folder was named
    as ``config.data.cache_dir='.../.lra_retrieval-scratch-...'``."""
    token = _SHOWN_AS.set((str(folder), key))
    try:
        yield
    finally:
        _SHOWN_AS.reset(token)


@contextlib.contextmanager
def naming_the_cache_dir(cache_dir: str | Path, key: str = "cache_dir") -> Iterator[None]:
    """Turn a read-only, forbidden or full ``cache_dir`` (an ``OSError`` naming a subfolder of
    it, or none; tfds's RuntimeError for a full disk) into a ValueError naming
    ``config.data.<key>`` (or what :func:`cache_shown_as` says) and the fix."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        shown, key = _SHOWN_AS.get() or (str(cache_dir), key)
        if is_out_of_space(error):
            free = describe_free_space(cache_dir)
            raise ValueError(
                f"config.data.{key}={shown!r} is full ({os.strerror(errno.ENOSPC)}"
                f" preparing the data; {free}): free space there, or set "
                f"--config.data.{key} to a folder with room, and run again (nothing "
                "half-prepared was kept)"
            ) from None
        if (
            not isinstance(error, OSError)
            or error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM)
            or not _under(error.filename, cache_dir)
        ):
            raise  # a source the build reads, say: its own message names it
        raise ValueError(
            f"config.data.{key}={shown!r} cannot hold the prepared data "
            f"({error.strerror}: {error.filename}); set --config.data.{key} to a folder "
            "this user can write"
        ) from None


def _under(filename: Any, folder: str | Path) -> bool:
    """Whether an OSError's ``filename`` (None: not known, taken as inside) lies in ``folder``."""
    if filename is None:
        return True
    return Path(os.path.abspath(os.fsdecode(filename))).is_relative_to(os.path.abspath(folder))


def writable_memmap(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """``np.lib.format.open_memmap(path, "w+", dtype, shape)`` with the file's blocks reserved
    first: writing into a memory map on a full disk killed the process with SIGBUS (``Fatal
    Python error: Bus error``, no message, the temporary folder left behind), where reserving
    raises ``OSError(ENOSPC)``, which :func:`prepared` reports naming the cache folder."""
    array = np.lib.format.open_memmap(path, "w+", dtype, shape)
    try:
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.path.getsize(path))
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            del array
            raise
    return array


def cache_folder(cache_dir: str | Path, name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir) / f"{name}-{digest[:12]}"


_BUILT_HERE: set[Path] = set()
"""Cache folders this process built: each split of a first run reads its folder again, and
the reminder of skipped examples was given three times in the run that had just listed them."""


def prepared(
    cache_dir: str | Path, name: str, key: dict[str, Any], build: Callable[[Path], None]
) -> Path:
    """The folder ``cache_dir/name-<hash of key>`` holding prepared arrays, built on first use.

    ``build(folder)`` writes the arrays into an empty temporary folder that is then renamed into
    place, so a crash never leaves a half-prepared cache and several processes may race safely.
    Bad examples the build skipped (its :class:`~hgrn_jax.data.errors.SkippedExamplesWarning`)
    are recorded there and warned of again each time the folder is reused: its key (file sizes
    and times, or a metadata file) may not change when the skipped files are mended. A folder
    is reused only whole: a file missing or of another size than its DONE records (a copy to
    another host cut short) is a :class:`~hgrn_jax.data.errors.BadDataError` naming the file and
    the fix (:func:`check_complete`).
    """
    folder = cache_folder(cache_dir, name, key)
    if (folder / DONE).is_file():
        check_complete(folder)
        if folder not in _BUILT_HERE:  # this process warned of its skipped examples as it built
            _warn_of_skipped(folder)
        return folder
    if os.path.lexists(folder):
        raise _not_ours(folder)
    check_cache_dir(cache_dir)
    with naming_the_cache_dir(cache_dir):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        follow_umask(tmp, directory=True)
        failure: Exception | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedExamplesWarning)
            try:
                with naming_the_cache_dir(cache_dir):
                    build(tmp)
            except Exception as error:  # the bad examples it warned of are still told, below
                failure = error
        skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedExamplesWarning)]
        if skipped and failure is None:
            (tmp / SKIPPED).write_text("\n".join(skipped) + "\n")
        for w in caught:  # as they were, now that the build's ones are recorded
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if failure is not None:
            raise failure
        (tmp / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
        (tmp / DONE).write_text(json.dumps({"sizes": file_sizes(tmp)}, indent=0, sort_keys=True))
        _BUILT_HERE.add(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first (or made the folder otherwise)
            if not (folder / DONE).is_file():
                raise _not_ours(folder) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _not_ours(folder: Path) -> BadDataError:
    """The error for a cache folder without DONE: this module renames a finished build into
    place, DONE included, so it is someone's copy, perhaps still in progress (such a folder
    was deleted and built again, a user's files in it with it)."""
    return BadDataError(
        f"{folder} exists but holds no {DONE} file (a copy of a prepared cache still in "
        "progress, or cut short?); nothing was changed. Finish the copy, or remove the folder "
        "to prepare it again"
    )


def damaged(file: str | Path, folder: str | Path, problem: str) -> BadDataError:
    """The one-line error for a file of a prepared folder that is missing, short or unreadable
    (an interrupted copy of the cache to another host, say): it names the file and the fix."""
    problem = " ".join(str(problem).split())
    return BadDataError(
        f"{file} of the prepared data is damaged ({problem}): remove {folder} to prepare it "
        "again, or copy it completely"
    )


def file_sizes(folder: Path) -> dict[str, int]:
    """``{path relative to folder: size in bytes}`` of every file in ``folder`` but DONE."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != DONE
    }


def check_complete(folder: Path) -> None:
    """Raise :func:`damaged` for a file of a prepared ``folder`` that is missing or has another
    size than its DONE records (copied in part); a DONE without sizes (older code) passes."""
    done = folder / DONE
    try:
        text = done.read_text()
        if not text.strip():
            return
        expected = {str(name): int(size) for name, size in json.loads(text)["sizes"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSON, UTF-8: ValueErrors
        reason = f"no readable list of the file sizes: {type(error).__name__}: {error}"
        raise damaged(done, folder, reason) from None
    for name, size in expected.items():
        path = folder / name
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise damaged(path, folder, "missing") from None
        if actual != size:
            raise damaged(path, folder, f"{actual} bytes where {size} were prepared") from None


def _warn_of_skipped(folder: Path) -> None:
    try:
        skipped = (folder / SKIPPED).read_text().strip()
    except FileNotFoundError:
        return
    count = skipped.splitlines()[0] if skipped else ""
    warnings.warn(
        f"{folder} was prepared without bad examples (data.skip_bad_rows=True: {count} ...; "
        f"all in {folder / SKIPPED}) and is used as it is; if those files have been mended "
        "since, move that folder away to prepare the data again",
        SkippedExamplesWarning,
        stacklevel=3,
    )


def save_arrays(folder: Path, prefix: str, arrays: dict[str, np.ndarray]) -> None:
    for key, value in arrays.items():
        np.save(folder / f"{prefix}.{key}.npy", value, allow_pickle=False)


def load_arrays(folder: Path, prefix: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Memory-mapped arrays ``folder/prefix.<key>.npy`` (read-only); a missing, short or
    malformed file is :func:`damaged` (other OSErrors, e.g. a forbidden file, name the file)."""
    arrays = {}
    for key in keys:
        path = folder / f"{prefix}.{key}.npy"
        try:
            arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise damaged(path, folder, "missing") from None
        except (ValueError, EOFError) as error:  # a short file: mmap's, numpy's header reader's
            raise damaged(path, folder, f"{type(error).__name__}: {error}") from None
    return arrays


def npy_file_of(array: Any) -> str | None:
    """The ``.npy`` file that ``array`` maps whole (as :func:`load_arrays` gives it), or None.

    A slice of such a memmap is a memmap with the same file name, whose rows the name alone
    does not give: only the array ``np.load`` returned sits directly on the file's mmap."""
    if isinstance(array, np.memmap) and array.filename and isinstance(array.base, mmap.mmap):
        return array.filename
    return None


class Progress:
    """Progress of a long preparation (decoding 200,000 Path-X images, tokenising WikiText-103),
    logged at INFO: ``<what>: <done>/<total> <unit> (<s> s)`` at most every
    :data:`PROGRESS_EVERY_S` seconds by :meth:`update`, and once more by :meth:`finish`."""

    def __init__(self, what: str, total: int | None, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.start = self.last = time.perf_counter()

    def _log(self, done: int) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        elapsed = time.perf_counter() - self.start
        logging.info("%s: %d%s %s (%.0f s)", self.what, done, of, self.unit, elapsed)

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self._log(done)

    def finish(self, done: int) -> None:
        self._log(done)
