"""Checksums of a finished checkpoint, recorded after Orbax commits it and verified on restore.

Orbax 0.12 records no checksum of the array data (its zarr3 layout checksums only the shard
index), so a flipped byte in an array file restores silently. Each step folder therefore gets an
``integrity.json`` once Orbax has finalised it: the size and SHA-256 of every file under the
folder. :func:`verify` re-reads them and classifies the checkpoint:

- :class:`Verified` / :class:`Unverified` (no manifest: a checkpoint written before this module
  existed, or a run killed between Orbax's commit and the manifest);
- :class:`DamagedCheckpointError`: a file listed in the manifest is missing, shorter or longer,
  or hashes differently (the checkpoint is moved aside by the caller, never deleted);
- :class:`CheckpointUnreadableError`: a file cannot be read for another reason (permissions,
  I/O errors): the caller stops and touches nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "integrity.json"
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the folder and what to do."""


class DamagedCheckpointError(CheckpointError):
    """Files of the checkpoint are missing, truncated or fail their checksum."""


class CheckpointUnreadableError(CheckpointError):
    """Files of the checkpoint exist but cannot be read (permissions, I/O errors)."""


@dataclasses.dataclass(frozen=True)
class Verified:
    files: int


@dataclasses.dataclass(frozen=True)
class Unverified:
    reason: str


# Errors that say "the bytes are not there" rather than "we may not read them".
_DAMAGE_ERRNOS = {errno.ENOENT, errno.ENOTDIR}


def classify_os_error(error: OSError, path: str | Path) -> CheckpointError:
    """A missing file is damage; permission, I/O and other errors are "unreadable"."""
    if isinstance(error, FileNotFoundError) or error.errno in _DAMAGE_ERRNOS:
        return DamagedCheckpointError(f"{path} is missing")
    if isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EPERM):
        return CheckpointUnreadableError(
            f"cannot read {path} (permission denied); give this user read access to the "
            "checkpoint folder (e.g. chmod -R u+rX) and run again"
        )
    return CheckpointUnreadableError(
        f"cannot read {path} ({error.strerror or error}); check the disk or file system and run "
        "again"
    )


def _digest(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _files(folder: Path) -> list[Path]:
    def raise_error(error: OSError) -> None:
        raise error

    out = []
    for root, _, names in os.walk(folder, onerror=raise_error):
        for name in names:
            path = Path(root) / name
            if path.parent == folder and name.startswith(MANIFEST):
                continue
            out.append(path)
    return sorted(out)


def write_manifest(folder: str | Path) -> None:
    """Record size and SHA-256 of every file under the finished step ``folder`` (atomically)."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        size, sha = _digest(path)
        files[path.relative_to(folder).as_posix()] = {"size": size, "sha256": sha}
    replace_synced(
        folder / MANIFEST,
        json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True),
    )


def replace_synced(path: Path, text: str) -> None:
    """Replace the file at ``path`` by ``text`` atomically (a temporary file, then a rename),
    the bytes synced to disk before the rename and the rename after it: a power loss leaves
    the old file or the new one, never an empty one (a file system may commit a rename before
    the data it names)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass  # a file system that cannot sync a folder (some network ones)
    finally:
        os.close(folder)


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def _manifest_files(manifest: Any) -> dict[str, dict[str, Any]]:
    """The ``files`` of a parsed manifest, each ``{"size": int, "sha256": str}``; TypeError or
    KeyError for anything else (a manifest edited or written by something else)."""
    files = manifest["files"]
    if not isinstance(files, dict):
        raise TypeError(f"'files' is a {type(files).__name__}, not an object")
    for relative, record in files.items():
        if not (
            isinstance(record, dict)
            and type(record.get("size")) is int
            and isinstance(record.get("sha256"), str)
        ):
            raise TypeError(f"the record of {relative!r} is not {{'size': int, 'sha256': str}}")
    return files


def verify(folder: str | Path) -> Verified | Unverified:
    """Check every file under ``folder`` against its manifest.

    Every file is read even without a manifest, so that a permission or I/O problem is found
    here (:class:`CheckpointUnreadableError`) rather than deep inside TensorStore.
    Raises :class:`DamagedCheckpointError` for missing, resized or changed files.
    """
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise DamagedCheckpointError(f"{folder} is missing")
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            for path in _files(folder):
                with open(path, "rb") as f:
                    while f.read(_CHUNK):
                        pass
            return Unverified(
                f"{folder} has no {MANIFEST} (saved before checksums were recorded, "
                "or the run stopped right after saving it)"
            )
        try:
            expected = _manifest_files(json.loads(manifest_path.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise DamagedCheckpointError(f"{manifest_path} is unreadable ({error})") from None
        for relative, record in sorted(expected.items()):
            path = folder / relative
            size, sha = _digest(path)
            if size != record["size"]:
                raise DamagedCheckpointError(
                    f"{path} has {size} bytes; {record['size']} were written (truncated?)"
                )
            if sha != record["sha256"]:
                raise DamagedCheckpointError(f"{path} fails its SHA-256 checksum (changed on disk)")
        return Verified(len(expected))
    except OSError as error:
        raise classify_os_error(error, getattr(error, "filename", None) or folder) from None
