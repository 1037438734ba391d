"""How much room a file system has left, in words for an out-of-space error."""

from __future__ import annotations

import os
from pathlib import Path


def describe_free_space(folder: str | Path) -> str:
    """``"62.4 MiB free"`` for the file system holding ``folder``; with ``", but 0 of 400
    inodes: no new file can be made"`` appended when it is out of inodes (files), which
    fails writes with the same "No space left on device" while bytes are free; ``"free space
    unknown"`` when it cannot be asked."""
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return "free space unknown"
    text = f"{stats.f_bavail * stats.f_frsize / 2**20:.1f} MiB free"
    # f_files is 0 on file systems without a fixed inode count (btrfs, some network mounts).
    if stats.f_files and not stats.f_favail:
        text += f", but 0 of {stats.f_files} inodes: no new file can be made"
    return text
