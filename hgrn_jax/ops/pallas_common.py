"""What the tiled and the streaming Pallas recurrence kernels share: their refs grouped per
array, and rounding a size up to whole tiles."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def split_refs(refs, parts: int, count: int = 5):
    """``refs`` in ``count`` groups of ``parts`` (1 real, 2 complex) refs each."""
    return [refs[k * parts : (k + 1) * parts] for k in range(count)]
