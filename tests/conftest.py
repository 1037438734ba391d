"""Test set-up: 8 simulated CPU devices (set before JAX initialises) and the golden data."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The suite compiles thousands of small programs, and LLVM's optimisation passes are most of each
# CPU compile while buying nothing at test sizes. Level 0 keeps the XLA program (fusion, layouts,
# sharding, collectives) and IEEE float semantics; only the last bits of some results move (e.g.
# fused multiply-adds), so every tolerance holds. It cuts the suite's CPU time by ~40% (measured:
# test_recurrence, test_hgru and test_models 313 -> 182 CPU-s; a 4-process pod run 94 -> 67).
# XLA's older elemental emitters then compile CPU fusions in about 60% of the time its MLIR
# fusion emitters take (measured: an HGRN2 LM's 62 eager ops 1.8 -> 1.0 s, its jitted gradient
# 1.5 -> 0.85 s); jaxlib 0.11 removed that switch (XLA aborts on an unknown flag), so only
# older jaxlibs get it. The flags go in the environment so that launched processes (pods,
# two-process runs) compile alike. HGRN_TEST_XLA_OPT=default runs the suite as users compile.
def _test_xla_flags() -> dict[str, str]:
    from importlib.metadata import version

    flags = {"xla_backend_optimization_level": "0"}
    jaxlib = tuple(int(part) for part in version("jaxlib").split(".")[:2])
    if jaxlib < (0, 11):
        flags["xla_cpu_use_fusion_emitters"] = "false"
    return flags


# Name -> value; test_user_compile.py takes them off again. (xdist's workers inherit them from the
# controller's environment, so each process adds only what is not there yet.)
TEST_XLA_FLAGS = _test_xla_flags()
if os.environ.get("HGRN_TEST_XLA_OPT", "0") != "default":
    _given = os.environ.get("XLA_FLAGS", "")
    _added = [f"--{name}={value}" for name, value in TEST_XLA_FLAGS.items() if name not in _given]
    os.environ["XLA_FLAGS"] = " ".join([_given, *_added]).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# A persistent compilation cache in a temporary folder of this test process: the suite builds the
# same programs again and again (each training run jits new closures, which miss JAX's in-memory
# caches), and a hit skips XLA's compile (a repeated tiny ListOps run: 8.2 -> 2.4 CPU-s). One
# folder per process, so that no two processes write an entry at once (JAX locks its cache only
# when eviction is on), set through jax.config and not the environment, so that launched
# processes do not inherit it (pods with a shared cache deadlock in gloo). It must precede the
# first compile. HGRN_TEST_COMPILATION_CACHE=0 turns it off.
if os.environ.get("HGRN_TEST_COMPILATION_CACHE", "1") != "0":
    _compilation_cache = tempfile.mkdtemp(prefix="hgrn-test-jax-cache-")
    atexit.register(shutil.rmtree, _compilation_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

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


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.slow] if name == "float64" else [])
        for name in sorted(PRECISIONS)
    ]
)
def golden_precision(request):
    """``(dtype, tolerance)`` of a golden comparison: float32, and float64 with x64 enabled
    (``slow``: the float32 cases are the fast loop's golden check)."""
    dtype, tol = PRECISIONS[request.param]
    with jax.enable_x64(dtype == jax.numpy.float64):
        yield dtype, tol


# test_user_compile.py runs these files whole, in a process compiling at XLA's default flags.
GOLDEN_FILES = ("test_golden.py", "test_golden_hgrn2.py")
USER_COMPILE_TEST = "test_user_compile.py::test_goldens_hold_at_xla_default_compile_flags"


# The files that take longest after the pods (seconds of one xdist worker, 2026-12-03), longest
# first: started early, they leave the short files to even out the two workers at the end.
LONG_FILES = (
    "test_training.py",  # ~160 (~120 before the two hung-input-worker tests, ~37 s)
    "test_user_compile.py",  # ~75
    "test_trained_model.py",  # ~65
    "test_sequence_parallel.py",  # ~60
    "test_kill_resume.py",  # ~60
    "test_faults.py",  # ~60
    "test_pallas.py",  # ~53
    "test_grain_pipeline.py",  # ~51 (~44 before the hung-worker test, ~7 s)
    "test_models.py",  # ~50
    "test_demo.py",  # ~45
    "test_kill_resume_workers.py",  # ~48
    "test_data_end_to_end.py",  # ~39
    "test_model_options.py",  # ~38
    "test_sharding.py",  # ~37
    "test_readme.py",  # ~28 (its tiny ListOps run ~12)
)


def _schedule_rank(item) -> tuple[int, int]:
    if item.get_closest_marker("pod") is not None:
        return (0, 0)
    name = item.path.name
    return (1, LONG_FILES.index(name)) if name in LONG_FILES else (2, 0)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
def pytest_collection_modifyitems(config, items):
    """The simulated pods first, then the other long files, longest first: one xdist worker
    runs a whole module (``make test`` distributes whole files, in this order), so starting the
    long chains early and ending on short files keeps the wall time short. (The sort is stable:
    a file's tests keep their order.)

    The golden comparisons run once: where test_user_compile's test is selected too (``make
    test``), it runs every test of the golden files at XLA's default flags, with the same
    assertions and tolerances, and fails unless all of them pass, so their runs at the suite's
    test flags are deselected (~20 CPU-s). ``make test-fast`` (no slow tests) and a run of the
    golden files alone keep them."""
    items.sort(key=_schedule_rank)
    if any(item.nodeid.endswith(USER_COMPILE_TEST) for item in items):
        golden = [item for item in items if item.path.name in GOLDEN_FILES]
        if golden:
            config.hook.pytest_deselected(items=golden)
            items[:] = [item for item in items if item.path.name not in GOLDEN_FILES]
