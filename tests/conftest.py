"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and the golden data."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from golden_helpers import PRECISIONS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("HGRN_GOLDEN_DIR", REPO / "tests" / "golden"))


class GoldenCase:
    """One golden case: ``arrays`` (the .npz), ``meta`` (the .json) and the reference params."""

    def __init__(self, name: str):
        npz, meta = GOLDEN_DIR / f"{name}.npz", GOLDEN_DIR / f"{name}.json"
        if not npz.exists():
            raise FileNotFoundError(
                f"golden case {npz} not found: the repo ships them in tests/golden; "
                "HGRN_GOLDEN_DIR must name a folder with the same case files"
            )
        with np.load(npz) as data:
            self.arrays = {k: data[k] for k in data.files}
        self.meta = json.loads(meta.read_text())
        self.name = name

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {k[len("param/") :]: v for k, v in self.arrays.items() if k.startswith("param/")}


@pytest.fixture(scope="session")
def golden():
    cache: dict[str, GoldenCase] = {}

    def load(name: str) -> GoldenCase:
        if name not in cache:
            cache[name] = GoldenCase(name)
        return cache[name]

    return load


@pytest.fixture(params=sorted(PRECISIONS))
def golden_precision(request):
    """``(dtype, tolerance)`` of a golden comparison: float32, and float64 with x64 enabled."""
    dtype, tol = PRECISIONS[request.param]
    with jax.enable_x64(dtype == jax.numpy.float64):
        yield dtype, tol
