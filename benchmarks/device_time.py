"""How busy the accelerator is during a training step: device time against step time.

    python benchmarks/device_time.py [--task lra|lm] [--full] [--batch N] [--lengths 1024 ...]
                                     [--methods auto] [--variants after ...] [--steps 5]

For each model of ``benchmarks/train_throughput.py`` (HGRN rows and the same-size Transformer)
it times ``--steps`` training steps back to back, then runs them again under
``jax.profiler.trace`` and reads the device's kernel events from the trace: per step, the
kernels launched, the time some kernel was running (the union of their intervals) and the step
time. ``busy`` = device time / step time: well under 1 means the device waits between kernels
(launch overhead, host work), so fewer, larger kernels would speed the step up; near 1 means
the kernels themselves must get faster. The largest kernels by total time are listed too.

Without device events (a CPU, or a GPU whose profiler cannot read them) the rows say so and
give the step time alone. A row that fails to compile or run is named in the JSON's
``meta.failed`` and left out, the others go on, and the script exits with an error at the end.
Results (rewritten after every row): ``benchmarks/results/device_time[TAG]_<platform>.json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from benchmarks.common import format_table, time_fn, write_results
from benchmarks.train_throughput import (
    VARIANTS,
    builders,
    random_tokens,
    row_names,
    train_step_fn,
    undone,
)
from hgrn_jax.ops import METHODS

DEVICE_MARKERS = ("/device:GPU", "/device:TPU", "GPU:", "TPU:")


def device_pids(events: list[dict]) -> set[int]:
    """The trace's process ids whose ``process_name`` metadata names an accelerator."""
    return {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and any(m in str(e.get("args", {}).get("name", "")) for m in DEVICE_MARKERS)
    }


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: time some kernel was running."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def device_activity(events: list[dict]) -> dict[str, Any] | None:
    """``{"kernels": n, "busy_s": union of kernel intervals, "by_name": {name: seconds}}`` of
    the accelerator's complete events (``ph == "X"``, microseconds), or None without any."""
    pids = device_pids(events)
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e]
    if not kernels:
        return None
    by_name: collections.Counter = collections.Counter()
    for e in kernels:
        by_name[e["name"]] += e["dur"] * 1e-6
    intervals = [(e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6) for e in kernels]
    return {"kernels": len(kernels), "busy_s": busy_seconds(intervals), "by_name": by_name}


def traced_events(fn, steps: int) -> list[dict]:
    """The trace events of ``steps`` calls of ``fn()`` back to back."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            out = None
            for _ in range(steps):
                out = fn()
            jax.block_until_ready(out)
        (path,) = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            return json.load(f)["traceEvents"]


def measure(args, length: int, on_row=None, failed: list[str] | None = None) -> list[dict]:
    """The rows at ``length``, each passed to ``on_row`` as soon as it is measured (the JSON is
    rewritten after every row). A row whose step fails to compile or run (out of memory, a
    kernel this GPU refuses) is reported, named in ``failed`` and left out; the others go on."""
    args.length = length
    models, _, loss, vocab_size = builders(args, None)
    ids = random_tokens(args.batch, length, vocab_size)
    rows = []
    for row_name, model_name, variant in row_names(args):
        try:
            step, state = train_step_fn(models[model_name](), loss)
            with undone(VARIANTS[variant]):
                executable = step.lower(*state, ids).compile()

            def run(executable=executable, state=state):
                return executable(*state, ids)

            step_s = time_fn(run, reps=1, calls_per_rep=args.steps)["median"]
            activity = device_activity(traced_events(run, args.steps))
        except Exception as error:  # e.g. out of memory: report it and go on
            message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            print(f"{row_name} L={length}: FAILED {message[:1000]}", file=sys.stderr, flush=True)
            if failed is not None:
                failed.append(f"{row_name} L={length}: {message[:300]}")
            if on_row is not None:
                on_row(None)
            continue
        row = {"model": row_name, "length": length, "step_ms": step_s * 1e3}
        if activity is None:
            row.update(kernels_per_step=None, device_ms=None, busy=None, top_kernels=None)
        else:
            device_s = activity["busy_s"] / args.steps
            top = activity["by_name"].most_common(args.top)
            row.update(
                kernels_per_step=activity["kernels"] / args.steps,
                device_ms=device_s * 1e3,
                busy=device_s / step_s,
                top_kernels={name: s / args.steps * 1e3 for name, s in top},
            )
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
        if on_row is not None:
            on_row(row)
    return rows


COLUMNS = ["model", "length", "step_ms", "kernels_per_step", "device_ms", "busy"]


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests/test_gpu_session.py, which checks
    benchmarks/gpu_session.sh's flags against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="lra", choices=["lm", "lra"])
    parser.add_argument("--full", action="store_true", help="the paper's model size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--methods", nargs="+", choices=["auto", *METHODS], default=["auto"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["after"])
    parser.add_argument("--steps", type=int, default=5, help="steps timed, then traced")
    parser.add_argument("--top", type=int, default=8, help="largest kernels kept per row")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    args.scan = "1d"
    meta = {
        "task": args.task,
        "full": args.full,
        "batch": args.batch,
        "steps": args.steps,
        "step": "loss + grad + AdamW update, jitted (train_throughput.py's)",
        "busy": "union of the device's kernel intervals per step / step time (steps back to back)",
    }
    rows: list[dict[str, Any]] = []
    failed = meta["failed"] = []
    name = "device_time" + args.tag

    def on_row(row: dict | None) -> None:
        """A measured row (None: a failed one, named in meta["failed"]): the JSON rewritten."""
        if row is not None:
            rows.append(row)
        write_results(name, rows, meta)

    for length in args.lengths:
        measure(args, length, on_row, failed)
    print(format_table(rows, COLUMNS))
    for row in rows:
        if row["top_kernels"]:
            print(f"{row['model']} L={row['length']}, largest kernels (ms per step):")
            for kernel, ms in row["top_kernels"].items():
                print(f"  {ms:8.3f}  {kernel[:100]}")
    print("wrote", write_results(name, rows, meta))
    if failed:
        raise SystemExit(f"device_time: {len(failed)} rows failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
