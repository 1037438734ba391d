"""The golden comparisons as users compile.

The suite compiles with test-only XLA flags that make compiling fast (tests/conftest.py: LLVM at
level 0, and XLA's older CPU emitters under jaxlib < 0.11). Those move the last bits of some
results, which every tolerance absorbs, but no other test runs the reference comparisons at XLA's
defaults. This one runs both golden files in a fresh pytest process with those flags taken off
(``HGRN_TEST_XLA_OPT=default``), at their own tolerances (tests/golden_helpers.py). Where it is
selected, conftest deselects the golden files' runs at the test flags: this is their one run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import GOLDEN_FILES, TEST_XLA_FLAGS
from two_processes import REPO, xla_flags_without


@pytest.mark.slow  # a fresh process compiling every golden case at XLA's defaults: ~40 s
def test_goldens_hold_at_xla_default_compile_flags():
    flags = xla_flags_without(*TEST_XLA_FLAGS)
    env = dict(os.environ, HGRN_TEST_XLA_OPT="default", XLA_FLAGS=flags)
    assert "xla_backend_optimization_level" not in env["XLA_FLAGS"]
    assert "xla_cpu_use_fusion_emitters" not in env["XLA_FLAGS"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(f"tests/{name}" for name in GOLDEN_FILES),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) >= 30, summary  # every case ran: float32 and float64
    assert not re.search(r"skipped|deselected|xfail", summary), summary
