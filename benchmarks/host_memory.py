"""CPU training steps with glibc's default allocator, with transparent huge pages for malloc,
and with a heap that keeps its pages.

    python benchmarks/host_memory.py [--rounds 3] [--reps 5] [--length 1024]

XLA:CPU allocates the buffers of every step with ``malloc``: one temporary arena per step (361
MiB for the d 32 LRA Text classifier of ``train_throughput.py`` at L = 4k) plus the outputs. glibc serves allocations above
32 MiB with fresh ``mmap``-ed pages and unmaps them on ``free``, and a thread other than the
main one (XLA runs steps on its own threads) gets ``mmap``-ed pages for anything its 64 MiB
arena heaps cannot hold, whatever ``mmap_max`` says. So a step faults its memory in again at
every call: page faults, and TLB misses on every pass over memory. Two ``GLIBC_TUNABLES``
settings avoid that:

- ``huge pages``: ``glibc.malloc.hugetlb=1`` (glibc >= 2.35; the kernel's transparent huge pages
  in ``madvise`` or ``always`` mode) makes malloc ask for 2 MiB pages: 512x fewer faults;
- ``retained heap``: ``glibc.malloc.arena_max=1`` (every thread allocates from the main heap),
  ``mmap_max=0`` (never ``mmap`` an allocation) and a 4 GiB ``trim_threshold`` (never give
  freed memory back): after the first step every allocation reuses pages the process already
  has, so a step makes no page faults; the price is a resident size that stays at the peak.

The variable is read when a process starts, so each setting runs in its own child process; the
children alternate (``--rounds`` rounds, default first), and every row is the fastest step over
all rounds of its setting, with the minor page faults per step of that child. Rows: one
training step (loss, gradient, AdamW) of the LRA Text classifier (HGRN, 1-D complex mixer, d
128, 4 layers, batch 8) and of the small LM (d 128, 2 layers, vocab 1024, batch 1), each
against the same-size Transformer of ``benchmarks/train_throughput.py``, and one elementwise
pass ``a * x + x`` over fresh (8, 4096, 512) float32 arrays.

Neither setting is switched on by the project: with the kernel's ``defrag`` setting a huge page
fault may compact memory first, and on a loaded machine that stall can outweigh the gain; a
retained heap holds the step's peak memory for the life of the process (see
``benchmarks/README.md``). Results: ``benchmarks/results/host_memory_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "default malloc": "",
    "huge pages": "glibc.malloc.hugetlb=1",
    "retained heap": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0"
    ":glibc.malloc.trim_threshold=4294967296",
}


def timed(fn, args: tuple, reps: int) -> tuple[float, float]:
    """``(fastest of reps calls in seconds, minor page faults per call)``."""
    import jax

    jax.block_until_ready(fn(*args))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / reps


def child(length: int, reps: int) -> dict[str, tuple[float, float]]:
    """``{step: (fastest of reps calls in seconds, page faults per call)}`` (run inside a child
    process)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import train_throughput as tt

    results: dict[str, tuple[float, float]] = {}
    for task, batch in (("lra", 8), ("lm", 1)):
        args = argparse.Namespace(
            task=task, scan="1d", full=task == "lra", length=length, methods=["auto"]
        )
        models, _, loss, vocab_size = tt.builders(args, jnp.float32)
        ids = tt.random_tokens(batch, length, vocab_size)
        for name, build in models.items():
            step, state = tt.train_step_fn(build(), loss)
            executable = step.lower(*state, ids).compile()
            results[f"{task} {name.split('[')[0]}"] = timed(executable, (*state, ids), reps)
    a = jnp.full((8, 4096, 512), 0.5, jnp.float32)
    x = jnp.ones((8, 4096, 512), jnp.float32)
    floor = jax.jit(lambda a, x: a * x + x).lower(a, x).compile()
    results["a * x + x (8, 4096, 512)"] = timed(floor, (a, x), reps)
    return results


def run_child(tunables: str, args: argparse.Namespace) -> dict[str, list[float]]:
    from benchmarks.common import run_child as run_json_child

    command = [
        sys.executable,
        __file__,
        "--child",
        f"--length={args.length}",
        f"--reps={args.reps}",
    ]
    setting = f"GLIBC_TUNABLES={tunables}" if tunables else "glibc's default malloc"
    result, _ = run_json_child(
        command, f"the child process with {setting}", env={"GLIBC_TUNABLES": tunables or None}
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.length, args.reps)))
        return

    from benchmarks.common import format_table, write_results

    load_before = os.getloadavg()
    best: dict[str, dict[str, tuple[float, float]]] = {setting: {} for setting in SETTINGS}
    for round_index in range(args.rounds):
        for setting, tunables in SETTINGS.items():
            for name, (seconds, faults) in run_child(tunables, args).items():
                if seconds < best[setting].get(name, (float("inf"), 0.0))[0]:
                    best[setting][name] = (seconds, faults)
            print(f"round {round_index + 1}/{args.rounds}: {setting} done", flush=True)
    default = best["default malloc"]
    rows = []
    for name, (default_s, default_faults) in default.items():
        row = {"step": name, "default_ms": default_s * 1e3, "default_faults": default_faults}
        for setting in list(SETTINGS)[1:]:
            seconds, faults = best[setting][name]
            key = setting.replace(" ", "_")
            row |= {f"{key}_ms": seconds * 1e3, f"{key}_faults": faults}
            row[f"{key}_speedup"] = default_s / seconds
        rows.append(row)
    columns = ["step", "default_ms", "default_faults"]
    for setting in list(SETTINGS)[1:]:
        key = setting.replace(" ", "_")
        columns += [f"{key}_ms", f"{key}_faults", f"{key}_speedup"]
    print(format_table(rows, columns))
    print(
        f"fastest of {args.reps} calls x {args.rounds} alternating child processes per setting; "
        f"L = {args.length}; faults = minor page faults per call; speedup = default / setting"
    )
    if not args.no_write:
        meta = dict(
            settings=SETTINGS,
            length=args.length,
            reps=args.reps,
            rounds=args.rounds,
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
        )
        print("wrote", write_results("host_memory", rows, meta))


if __name__ == "__main__":
    main()
