"""Shared helpers for the benchmark scripts: timing, compiled memory, machine info, JSON results.

Use from a script in ``benchmarks/`` (run as ``python benchmarks/<name>.py``)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import time_fn, temp_bytes, write_results
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform as py_platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = RESULTS_DIR.parents[1]
RESULTS_DIR_VARIABLE = "HGRN_BENCH_RESULTS"


def _load_averages() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none: Windows)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


_LOAD_AT_START = _load_averages()  # when a benchmark imports this module, before it measures


def results_dir() -> Path:
    """Where :func:`write_results` writes: ``$HGRN_BENCH_RESULTS`` when set (a trial run that
    must not replace the committed numbers), else ``benchmarks/results/``."""
    return Path(os.environ.get(RESULTS_DIR_VARIABLE) or RESULTS_DIR)


def time_fn(
    fn: Callable[..., Any], *args: Any, reps: int = 5, warmup: int = 1, calls_per_rep: int = 1
) -> dict[str, float]:
    """Wall-clock seconds of ``fn(*args)`` (typically a jitted function), blocking on the result.

    The first ``warmup`` calls (compilation included) are not counted. Returns the ``median``,
    ``min`` and ``max`` over ``reps`` timed repetitions. A repetition makes ``calls_per_rep``
    calls back to back and blocks on the last (an accelerator queues them, so the host's
    dispatch and the wait for one result are paid once) and counts its time per call.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls_per_rep - 1):
            fn(*args)
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) / calls_per_rep)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def temp_bytes(fn: Callable[..., Any], *args: Any) -> int | None:
    """Temporary buffer bytes XLA allocates for ``jax.jit(fn)(*args)`` (excludes arguments and
    outputs), from the compiled memory analysis; None where the backend does not report it."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)


# Instructions that launch no work of their own.
BOOKKEEPING_OPS = frozenset(
    {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "opt-barrier"}
)
# One instruction of HLO text: its name, result shape, opcode and the rest of the line (operands
# first). Also read by benchmarks/hlo_kernels.py.
HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>\([^=]*?\)|\S+) "
    r"(?P<opcode>[\w\-]+)\((?P<rest>.*)$"
)
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_CALLED = re.compile(r"\b(?:to_apply|body|condition|branch_computations)=\{?%?([\w.\-%, ]+)\}?")


def step_op_counts(compiled: Any) -> dict[str, int]:
    """``{opcode: count}`` of the instructions that do work in one call of a compiled
    executable (fusions, matmuls, custom calls such as Pallas/Triton kernels, copies), read from
    its HLO: the entry computation, and the computations its ``call``, ``while`` and
    ``conditional`` instructions run (a loop body counted once; ``"while"`` counts the loops).
    Bookkeeping (parameters, tuples, bitcasts, ...) is left out. On a GPU each counted
    instruction outside a loop is about one kernel launch per step."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in compiled.as_text().splitlines():
        if (
            line.endswith("{")
            and not line.startswith(" ")
            and (head := _HLO_COMPUTATION.match(line))
        ):
            current = computations.setdefault(head.group(1), [])
            entry = head.group(1) if line.startswith("ENTRY ") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    counts: dict[str, int] = {}

    def visit(name: str, seen: frozenset) -> None:
        for line in computations.get(name, []):
            match = HLO_INSTRUCTION.match(line)
            if not match or match["opcode"] in BOOKKEEPING_OPS:
                continue
            opcode = match["opcode"]
            if opcode in ("call", "while", "conditional"):
                if opcode == "while":
                    counts["while"] = counts.get("while", 0) + 1
                for group in _CALLED.findall(match["rest"]):
                    for callee in (c.strip().lstrip("%") for c in group.split(",")):
                        if callee and callee not in seen:
                            visit(callee, seen | {callee})
                continue
            counts[opcode] = counts.get(opcode, 0) + 1

    if entry is not None:
        visit(entry, frozenset({entry}))
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return py_platform.processor() or "unknown"


def _version(package: str) -> str | None:
    """The version of ``package``: the imported module's where it is imported (a lent machine
    may import another copy than the one installed), else the installed one's; None where it is
    not installed."""
    module = sys.modules.get(package)
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: platform, device kind and count, CPU, versions (jax,
    jaxlib, flax, optax: a lent machine's image has its own), date."""
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "jax_version": jax.__version__,
        "jaxlib_version": _version("jaxlib"),
        "flax_version": _version("flax"),
        "optax_version": _version("optax"),
        "python_version": py_platform.python_version(),
        # glibc.malloc.hugetlb=1 changes CPU timings a lot (page faults of fresh arrays).
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # 1, 5 and 15-minute load averages: on a shared machine, how quiet the run was.
        "load_average_at_start": _LOAD_AT_START,
        "load_average_at_end": _load_averages(),
    }


def run_child(
    command: list[str], what: str, env: dict[str, str | None] | None = None
) -> tuple[Any, str]:
    """Run ``command`` (a benchmark's child process; the repository importable, ``env``'s
    variables set, or removed where None) and return the JSON value on the last line of its
    stdout, and its stderr. A failed child ends this process, naming ``what`` and showing the
    end of the child's stderr."""
    child_env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name, value in (env or {}).items():
        if value is None:
            child_env.pop(name, None)
        else:
            child_env[name] = value
    done = subprocess.run(command, env=child_env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def write_results(
    name: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None
) -> Path:
    """Write ``{"machine": ..., "meta": meta, "rows": rows}`` to
    ``<results_dir()>/<name>_<platform>.json`` and return the path."""
    machine = machine_info()
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{machine['platform']}.json"
    payload = {"machine": machine, "meta": meta or {}, "rows": rows}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``columns`` from ``rows`` (floats with 3 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
