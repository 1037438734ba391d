"""What a process does when its terminal hangs up (SIGHUP: an ssh connection lost, a terminal
window shut): :func:`leave_the_terminal`. Imports nothing heavy, for the launcher."""

from __future__ import annotations

import os
import stat


def leave_the_terminal() -> None:
    """Point stdout and stderr at ``/dev/null`` where they are a terminal (a character device
    other than ``/dev/null``; ``isatty`` fails on a terminal that hung up), so that the
    process's last lines, written while it saves and stops, do not fail with EIO. A file or
    pipe they were redirected to keeps them."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        null_device = os.fstat(null).st_rdev
        for fd in (1, 2):
            try:
                mode = os.fstat(fd)
            except OSError:
                continue
            if stat.S_ISCHR(mode.st_mode) and mode.st_rdev != null_device:
                os.dup2(null, fd)
    finally:
        os.close(null)
