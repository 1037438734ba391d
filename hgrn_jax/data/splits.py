"""``torch.utils.data.random_split`` with ``torch.Generator().manual_seed(seed)``, in numpy.

The reference splits Pathfinder / Path-X (80/10/10) and CIFAR-10 (90/10) with
``random_split(dataset, lengths, generator=torch.Generator().manual_seed(42))``, which takes
consecutive slices of ``torch.randperm(n, generator=...)``. On the CPU, for
``n < 2**32 / 20``, torch's randperm is a Fisher-Yates shuffle driven by its MT19937 generator
(``aten/src/ATen/native/TensorFactories.cpp``, ``randperm_cpu``)::

    perm = [0, 1, ..., n - 1]
    for i in 0 .. n - 2:  z = random32() % (n - i);  swap(perm[i], perm[i + z])

``manual_seed(s)`` seeds MT19937 with the standard ``init_genrand(s)``, which is also how
numpy's legacy ``RandomState(s)`` seeds it, so numpy's MT19937 with that state yields the same
32-bit words. ``tests/test_tokenise.py`` holds permutations computed by torch to check this.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MAX_N = (2**32 - 1) // 20  # above this torch switches to a 64-bit draw (not needed here)


def mt19937_words(seed: int, count: int) -> np.ndarray:
    """The first ``count`` 32-bit outputs (uint64) of MT19937 seeded by ``init_genrand(seed)``."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32); got {seed}")
    key = np.random.RandomState(seed).get_state()[1]  # legacy seeding = init_genrand
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return generator.random_raw(count).astype(np.uint64)


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` (CPU) as int64."""
    if not 0 <= n < _MAX_N:
        raise ValueError(f"n must be in [0, {_MAX_N}); got {n}")
    perm = list(range(n))
    if n > 1:
        spans = np.arange(n, 1, -1, dtype=np.uint64)  # n - i for i = 0 .. n - 2
        targets = (mt19937_words(seed, n - 1) % spans).astype(np.int64) + np.arange(n - 1)
        for i, z in enumerate(targets.tolist()):
            perm[i], perm[z] = perm[z], perm[i]
    return np.array(perm, np.int64)


def random_split(n: int, lengths: Sequence[int], seed: int) -> list[np.ndarray]:
    """The index lists of ``random_split(range(n), lengths, torch.Generator().manual_seed(seed))``
    (each in the permutation's order)."""
    if sum(lengths) != n:
        raise ValueError(f"split lengths {list(lengths)} must add up to {n}")
    perm = torch_randperm(n, seed)
    bounds = np.cumsum([0, *lengths])
    return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
