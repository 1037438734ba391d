"""Decisions that every process of a multi-host run must take identically.

Process 0 alone looks at the workdir (the lock, config.json, checkpoint checksums) and writes;
the others learn its outcome through a small collective, so that no process goes on training
while another has stopped.
"""

from __future__ import annotations

import jax
import numpy as np


class StoppedByAnotherProcess(RuntimeError):
    """Another process failed (its log has the reason); raised on the processes that did not."""


class StoppedByProcessZero(StoppedByAnotherProcess):
    """Process 0 refused to go on (its log has the reason); raised on the other processes."""


def broadcast_code(code: int) -> int:
    """Process 0's ``code`` on every process (``code`` is ignored on the others)."""
    if jax.process_count() == 1:
        return int(code)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any."""
    return any_process_each((flag,))[0]


def any_process_each(flags: tuple[bool, ...]) -> tuple[bool, ...]:
    """For each of ``flags``: true on every process when it is true on any (one all-gather of
    ``len(flags)`` int32s for all of them)."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))  # (processes, n)
    return tuple(bool(f) for f in np.any(np.asarray(gathered).reshape(-1, len(flags)), axis=0))


def failed_processes(failed: bool) -> list[int]:
    """The indices of the processes whose ``failed`` is true, on every process."""
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.int32(failed))  # (processes,)
    return [int(i) for i in np.flatnonzero(np.asarray(gathered).reshape(-1))]


def share_failures(error: BaseException | None, what: str) -> None:
    """Re-raise ``error`` where it happened and stop every other process with
    :class:`StoppedByAnotherProcess` naming the processes that failed; return quietly on every
    process when none did. For steps any process may fail alone (its own data files), so
    that the others stop with it instead of waiting for it in their first collective."""
    failed = failed_processes(error is not None)
    if error is not None:
        raise error
    if failed:
        names = ", ".join(map(str, failed))
        raise StoppedByAnotherProcess(
            f"process{'es' if len(failed) > 1 else ''} {names} stopped while {what}; "
            f"{'their logs give' if len(failed) > 1 else 'its log gives'} the reason"
        )


def share_outcome(error: BaseException | None, what: str) -> None:
    """Re-raise process 0's ``error`` there and stop the others with
    :class:`StoppedByProcessZero`; return quietly on every process when process 0 succeeded."""
    failed = broadcast_code(int(error is not None))
    if error is not None:
        raise error
    if failed:
        raise StoppedByProcessZero(f"process 0 stopped while {what}; its log gives the reason")
