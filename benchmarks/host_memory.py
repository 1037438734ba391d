"""CPU training steps with glibc's default allocator against transparent huge pages for malloc.

    python benchmarks/host_memory.py [--rounds 3] [--reps 5] [--length 1024]

XLA:CPU allocates the buffers of every step with ``malloc``. glibc serves allocations above
32 MiB (and, after frees, many smaller ones) with fresh ``mmap``-ed pages, so a step touches new
4 KiB pages again at every call: page faults, and TLB misses on every pass over memory.
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35; the kernel's transparent huge pages in
``madvise`` or ``always`` mode) makes malloc ask for 2 MiB pages instead. The variable is read
when a process starts, so each setting runs in its own child process; the children alternate
(``--rounds`` rounds, default first), and every row is the fastest step over all rounds of its
setting. Rows: one training step (loss, gradient, AdamW) of the LRA Text classifier (HGRN,
1-D complex mixer, d 128, 4 layers, batch 8) and of the small LM (d 128, 2 layers, vocab 1024,
batch 1), each against the same-size Transformer of ``benchmarks/train_throughput.py``, and one
elementwise pass ``a * x + x`` over fresh (8, 4096, 512) float32 arrays.

Huge pages are not switched on by the project: with the kernel's ``defrag`` setting a huge page
fault may compact memory first, and on a loaded machine that stall can outweigh the gain (see
``benchmarks/README.md``). Results: ``benchmarks/results/host_memory_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"default malloc": "", "huge pages": "glibc.malloc.hugetlb=1"}


def child(length: int, reps: int) -> dict[str, float]:
    """Fastest of ``reps`` calls of each step, in seconds (run inside a child process)."""
    import jax
    import jax.numpy as jnp

    from benchmarks import train_throughput as tt

    results: dict[str, float] = {}
    for task, batch in (("lra", 8), ("lm", 1)):
        args = argparse.Namespace(
            task=task, scan="1d", full=task == "lra", length=length, methods=["auto"]
        )
        models, _, loss, vocab_size = tt.builders(args, jnp.float32)
        ids = jax.random.randint(jax.random.key(length), (batch, length + 1), 0, vocab_size)
        for name, build in models.items():
            step, state = tt.train_step_fn(build(), loss)
            executable = step.lower(*state, ids).compile()
            jax.block_until_ready(executable(*state, ids))
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                jax.block_until_ready(executable(*state, ids))
                best = min(best, time.perf_counter() - start)
            results[f"{task} {name.split('[')[0]}"] = best
    a = jnp.full((8, 4096, 512), 0.5, jnp.float32)
    x = jnp.ones((8, 4096, 512), jnp.float32)
    floor = jax.jit(lambda a, x: a * x + x).lower(a, x).compile()
    jax.block_until_ready(floor(a, x))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(floor(a, x))
        best = min(best, time.perf_counter() - start)
    results["a * x + x (8, 4096, 512)"] = best
    return results


def run_child(tunables: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    command = [
        sys.executable,
        __file__,
        "--child",
        f"--length={args.length}",
        f"--reps={args.reps}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        setting = f"GLIBC_TUNABLES={tunables}" if tunables else "glibc's default malloc"
        sys.exit(f"the child process with {setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    best: dict[str, dict[str, float]] = {setting: {} for setting in SETTINGS}
    for round_index in range(args.rounds):
        for setting, tunables in SETTINGS.items():
            for name, seconds in run_child(tunables, args).items():
                best[setting][name] = min(seconds, best[setting].get(name, float("inf")))
            print(f"round {round_index + 1}/{args.rounds}: {setting} done", flush=True)
    rows = [
        {
            "step": name,
            "default_ms": best["default malloc"][name] * 1e3,
            "huge_pages_ms": best["huge pages"][name] * 1e3,
            "speedup": best["default malloc"][name] / best["huge pages"][name],
        }
        for name in best["default malloc"]
    ]
    print(format_table(rows, ["step", "default_ms", "huge_pages_ms", "speedup"]))
    print(
        f"fastest of {args.reps} calls x {args.rounds} alternating child processes per setting; "
        f"L = {args.length}; speedup = default / huge pages"
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
