"""The training step as a GPU would run it, compiled on a machine without one: kernels per step,
the bytes they move, and the lines of code they come from.

    python benchmarks/gpu_compile.py [--task lra|lm] [--full] [--lengths 1024 ...]
                                     [--methods associative pallas] [--variants after ...]
                                     [--scan 1d|2d] [--batch N] [--step benchmark|runner]
                                     [--measured PATH] [--tag _x]

XLA compiles for a GPU it does not have ("deviceless" ahead-of-time compilation): JAX's
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`` describes
the device (``H200``: an NVIDIA H200, sm_90), and ``jit(...).lower(...).compile()`` on that
topology runs XLA's whole GPU pipeline, the Pallas kernels' Triton compilation and ``ptxas``
included. So this checks that every row compiles for the GPU: a kernel the GPU compiler
rejects fails here, not on a lent machine (the script then exits with status 1, naming the
rows). And it counts what the compiled step launches: each instruction of its entry
computation that does work (a fusion, a matmul, a Pallas kernel, a copy) is one kernel per
step (``benchmarks/hlo_kernels.py``). Nothing is timed, and no autotuning runs (XLA
picks its default matmul configurations): the kernel count and the fusion are what the GPU
compiler decides, the times are not.

The rows are ``benchmarks/train_throughput.py``'s (the same models, losses, AdamW step and
``--variants``; ``--step runner``: the runner's own step instead, ``hgrn_jax.training``'s
``make_train_step`` with its gradient norm, non-finite guard and ``make_optimizer``'s AdamW with
gradient clipping, results ``..._runner[TAG]_cpu.json``), each compiled with
``jax.default_backend()`` reading ``"gpu"`` while it is traced, so that ``method="auto"``, the
fused projections and the Pallas kernels take their GPU paths. Columns: ``kernels`` per step
(``pallas``: of them Pallas kernels; ``loops``: ``while`` loops, each counted once, their
bodies not entered; ``small``: kernels that move under ``SMALL_KERNEL_BYTES``, whose time is
their launch and ramp, not their bytes), ``GiB`` = the bytes of every kernel's
operands and result (``Kernel.bytes``: what it moves when it reads each operand once; slices
and gathers move less), ``floor_ms`` = those bytes at the H200's 4.8 TB/s.

``--measured`` (default: this task's H200 results, ``train_throughput_full[_lra]_h200_gpu.json``;
none for ``--scan 2d``, which no GPU has timed) adds each row's measured step time where the
same step was timed (the same length and ``train_throughput.configuration``; what the H200
rows ran where they do not record it is ``TIMED_BEFORE_CONFIGURATIONS``), and fits
``step_ms = GiB / bandwidth + kernels x per_kernel_us`` by least squares over the measured rows
without Pallas kernels (the kernel's time depends on its schedule, not its bytes):
``predicted_ms`` for every row. A fit of a few rows from one run is a reading of where time goes,
not a timing.

Needs JAX's CUDA plugin, whose version matches jax's: in an environment of its own (it is not a
project dependency; on a machine without a GPU it only compiles), ``make gpu-compile-env``
(``.venv-gpu-compile/``) or ``pip install "jax-cuda12-plugin==$JAX_VERSION"
"jax-cuda12-pjrt==$JAX_VERSION"`` beside the project's requirements. Results:
``benchmarks/results/gpu_compile[_full][_lra][TAG]_cpu.json`` (``_cpu``: where it ran).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Compiled for a GPU, never run on one: with another platform first, the CUDA plugin checks the
# CUDA runtime and driver at start-up, fails on a machine without them, and JAX then has no CUDA
# topology to compile for. A lent GPU machine runs it the same way.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import train_throughput as throughput
from benchmarks.common import RESULTS_DIR, format_table, write_results
from benchmarks.hlo_kernels import Kernel, by_site, entry_kernels
from hgrn_jax.training.optim import make_optimizer
from hgrn_jax.training.state import initial_train_state, split_model
from hgrn_jax.training.steps import make_train_step

H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e
# The device XLA compiles for: an NVIDIA H200 (a GpuTargetConfig in text format). What decides
# the compilation is the compute capability (9.0, sm_90), the core count and the memory sizes.
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H200"
"""
TABLE_COLUMNS = [
    "model",
    "length",
    "kernels",
    "pallas",
    "loops",
    "small",
    "GiB",
    "floor_ms",
    "measured_ms",
    "predicted_ms",
]
TOP_SITES = 15
# A kernel moving less than this is all launch and ramp: 1 MiB is 0.2 us of the H200's HBM, a
# launch several us.
SMALL_KERNEL_BYTES = 2**20


def gpu_device() -> jax.Device:
    """The H200 of a one-device deviceless topology; a one-line error without the CUDA plugin."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=H200, topology="1x1x1"
        )
    except Exception as error:  # the plugin is missing, or its version is not jax's
        sys.exit(
            f"gpu_compile.py: no CUDA compiler in this environment ({type(error).__name__}: "
            f"{str(error)[:200]}); make gpu-compile-env, or pip install "
            f'"jax-cuda12-plugin=={jax.__version__}" "jax-cuda12-pjrt=={jax.__version__}"'
        )
    return topology.devices[0]


@contextlib.contextmanager
def traced_for_gpu():
    """While tracing inside, the model code's platform checks (``jax.default_backend()``) read
    ``"gpu"``: ``method="auto"``, the fused projections and the Pallas kernels (compiled, not
    interpreted) take their GPU paths."""
    with mock.patch.object(jax, "default_backend", return_value="gpu"):
        yield


def compile_rows(args, device: jax.Device, length: int, failed: list[str]) -> list[dict]:
    """Compile every row's training step at ``length`` for ``device``: one dict per row that
    compiled; the names of those that did not are appended to ``failed``."""
    args.length = length
    models, sizes, loss, vocab_size = throughput.builders(args, args.dtype)
    sharding = jax.sharding.SingleDeviceSharding(device)

    def abstract(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
        )

    ids = jax.ShapeDtypeStruct((args.batch, length + 1), jnp.int32, sharding=sharding)
    rows = []
    with traced_for_gpu():  # the GPU's defaults pick the rows and shape each step
        for row_name, model_name, variant in throughput.row_names(args):
            start = time.perf_counter()
            with throughput.undone(throughput.VARIANTS[variant]):
                step, state = STEPS[args.step](models[model_name](), loss)
                try:
                    compiled = step.lower(*abstract(state), ids).compile()
                except Exception as error:
                    print(
                        f"{row_name} L={length}: FAILED to compile for the GPU: "
                        f"{type(error).__name__}: {str(error)[:2000]}",
                        file=sys.stderr,
                        flush=True,
                    )
                    failed.append(f"{row_name} L={length}")
                    continue
            rows.append(
                {"model": row_name, "length": length}
                | step_identity(args.task, model_name, variant, length)
                | kernel_columns(entry_kernels(compiled.as_text()))
                | {"compile_s": time.perf_counter() - start}
            )
            print(
                f"{row_name} L={length}: {rows[-1]['kernels']} kernels, {rows[-1]['GiB']:.2f} GiB "
                f"(compiled in {rows[-1]['compile_s']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return rows


# The runner's optimizer in runner_step_fn: the benchmark's AdamW, with gradient clipping.
RUNNER_OPTIMIZER = dict(name="adamw", learning_rate=1e-4, weight_decay=1e-4, grad_clip_norm=1.0)


def runner_step_fn(model: nnx.Module, loss) -> tuple:
    """The runner's own training step for ``model`` (``hgrn_jax.training``: ``make_optimizer``,
    ``make_train_step`` with its gradient norm and non-finite guard), as a jitted ``(state, ids)
    -> (state, metrics)`` and ``(state,)``, in place of ``train_throughput.train_step_fn``'s
    plain AdamW step."""
    config = SimpleNamespace(optimizer=RUNNER_OPTIMIZER, schedule=dict(name="constant"))
    graphdef, params, model_state = split_model(model)
    tx, schedule = make_optimizer(config, params)
    state = initial_train_state(params, model_state, tx)

    def loss_fn(model, batch, *, train):
        del train  # make_train_step has set the model to training mode
        value = loss(model, batch["ids"])
        return value, {"loss_sum": value, "weight": jnp.ones((), jnp.float32)}  # Task protocol

    train_step = make_train_step(graphdef, tx, loss_fn, schedule)
    return jax.jit(lambda state, ids: train_step(state, {"ids": ids}), donate_argnums=0), (state,)


# --step: which training step each row compiles.
STEPS = {"benchmark": throughput.train_step_fn, "runner": runner_step_fn}


def step_identity(task: str, model_name: str, variant: str, length: int) -> dict:
    """What decides which timed step a row is (``add_measured``): its ``configuration`` as the
    GPU would run it (``train_throughput.configuration``), and whether the variant changes only
    what that records (``matchable``)."""
    with traced_for_gpu():
        config = throughput.configuration(task, model_name, variant, length)
    changes = set(throughput.VARIANTS[variant])
    return {"configuration": config, "matchable": changes <= throughput.CONFIGURED_CHANGES}


def kernel_columns(kernels: list[Kernel]) -> dict:
    """A row's columns from its compiled step's kernels."""
    total = sum(k.bytes for k in kernels)
    small = [k for k in kernels if k.bytes < SMALL_KERNEL_BYTES]
    small_at = collections.Counter(k.site for k in small)
    return {
        "kernels": len(kernels),
        "pallas": sum(k.is_pallas for k in kernels),
        "loops": sum(k.opcode == "while" for k in kernels),
        "small": sum(k.bytes < SMALL_KERNEL_BYTES for k in kernels),
        "GiB": total / 2**30,
        "floor_ms": total / H200_BANDWIDTH * 1e3,
        "sites": [
            {"site": site, "kernels": count, "small": small_at[site], "GiB": size / 2**30}
            for site, count, size in by_site(kernels)[:TOP_SITES]
        ],
        "small_sites": [
            {"site": site, "small": count, "GiB": size / 2**30}
            for site, count, size in by_site(small)[:TOP_SITES]
        ],
    }


def default_measured(args) -> Path:
    return RESULTS_DIR / (
        "train_throughput_full" + ("_lra" if args.task == "lra" else "") + "_h200_gpu.json"
    )


# What the H200's timed rows ran with where their JSON does not say (train_throughput.py rows
# of 2026-11-30 and before): a bidirectional mixer's two directions as two scans, the Pallas
# kernel's loads after its stores, no carries chained in the kernel, BatchNorm's gradient by
# autodiff, each direction's phases computed on their own.
TIMED_BEFORE_CONFIGURATIONS = {
    "directions_merged": False,
    "phases": "per direction",
    "batch_norm_gradient": "autodiff",
    "loads_ahead": False,
    "chain_in_kernel": False,
}
# The Pallas kernel's back-end, recorded in a row's configuration since 2026-12-06: the rows
# timed before ran the Triton kernels.
RECORDED_BEFORE_BACKEND = {"backend": "triton"}


def _match_key(kind: str, length: int, config: dict) -> tuple:
    return kind, length, tuple(sorted(config.items()))


def add_measured(rows: list[dict], path: Path, task: str) -> dict | None:
    """Each row's measured step time from ``path``, and the fit (:func:`fit_step_times`); None
    where ``path`` is missing or too few rows were timed. A row takes the time of a measured row
    of the same length that ran the same step: the same configuration
    (``train_throughput.configuration``: the method, the directions, the kernel's back-end and
    options; ``TIMED_BEFORE_CONFIGURATIONS`` where the measured JSON does not record it, and
    ``RECORDED_BEFORE_BACKEND`` where it records no back-end), and no change
    other than those (a row of, say, separate projections is never matched)."""
    if not path.is_file():
        print(f"no measured step times: {path} is not there", file=sys.stderr)
        return None
    measured = {}
    for timed in json.loads(path.read_text())["rows"]:
        model = timed["model"].split(" (")[0]
        config = timed.get("configuration")
        if config is None:
            if timed["model"] != model:  # a variant row of unknown configuration
                continue
            with traced_for_gpu():
                config = throughput.configuration(task, model, "after", timed["length"])
            config |= {k: v for k, v in TIMED_BEFORE_CONFIGURATIONS.items() if k in config}
            config |= {k: v for k, v in RECORDED_BEFORE_BACKEND.items() if k in config}
        elif config.get("method") == "pallas" and "backend" not in config:
            config = RECORDED_BEFORE_BACKEND | config
        kind = "transformer" if model == "transformer" else "hgrn"
        measured[_match_key(kind, timed["length"], config)] = timed["step_ms"]
    for row in rows:
        kind = "transformer" if row["model"] == "transformer" else "hgrn"
        key = _match_key(kind, row["length"], row["configuration"])
        row["measured_ms"] = measured.get(key) if row["matchable"] else None
    fit = fit_step_times(rows)
    if fit is not None:
        root = RESULTS_DIR.parents[1]
        fit["measured"] = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return fit


def fit_step_times(rows: list[dict]) -> dict | None:
    """Least squares ``measured_ms = GiB * ms_per_GiB + kernels * ms_per_kernel`` over the rows
    with a measured time and no Pallas kernel (whose time depends on its schedule, not its
    bytes); sets ``predicted_ms`` on every row. None with fewer than 3 such rows."""
    fitted = [r for r in rows if r.get("measured_ms") is not None and not r["pallas"]]
    if len(fitted) < 3:
        return None
    design = np.array([[r["GiB"], r["kernels"]] for r in fitted])
    target = np.array([r["measured_ms"] for r in fitted])
    (ms_per_gib, ms_per_kernel), *_ = np.linalg.lstsq(design, target, rcond=None)
    for row in rows:
        row["predicted_ms"] = float(row["GiB"] * ms_per_gib + row["kernels"] * ms_per_kernel)
    residuals = [r["predicted_ms"] / r["measured_ms"] - 1 for r in fitted]
    return {
        "rows": len(fitted),
        "bandwidth_TBps": 2**30 / (ms_per_gib * 1e-3) / 1e12 if ms_per_gib > 0 else None,
        "per_kernel_us": float(ms_per_kernel * 1e3),
        "largest_residual": max(residuals, key=abs),
    }


def _site_table(rows: list[dict], sites_key: str, count_key: str, title: str) -> None:
    """One table of ``rows[i][sites_key]``: a line of code per row, a column per model."""
    sites = list(dict.fromkeys(s["site"] for r in rows for s in r[sites_key]))
    table = [
        {"site": site if len(site) <= 64 else site[:63] + "~"}
        | {
            r["model"]: next((s[count_key] for s in r[sites_key] if s["site"] == site), 0)
            for r in rows
        }
        for site in sites
    ]
    print(f"\n{title}")
    print(format_table(table, ["site"] + [r["model"] for r in rows]))


def print_sites(rows: list[dict]) -> None:
    """Kernels, and small kernels, per line of code, one column per row of the first length."""
    length = rows[0]["length"]
    same = [r for r in rows if r["length"] == length]
    _site_table(
        same, "sites", "kernels", f"kernels per line of code, L = {length} (the top {TOP_SITES})"
    )
    under = f"under {SMALL_KERNEL_BYTES // 2**20} MiB"
    _site_table(same, "small_sites", "small", f"small kernels ({under}) per line, L = {length}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="lra", choices=["lm", "lra"])
    parser.add_argument("--full", action="store_true", help="the paper's model size (default)")
    parser.add_argument("--small", dest="full", action="store_false", help="the CPU model size")
    parser.set_defaults(full=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, help="default: the H200 runs' (8 lm, 32 lra)")
    parser.add_argument("--methods", nargs="+", default=["associative", "pallas"])
    parser.add_argument(
        "--variants", nargs="+", choices=list(throughput.VARIANTS), default=["after"]
    )
    parser.add_argument(
        "--scan", default="1d", choices=["1d", "2d"], help="the LRA classifier's mixer"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--step",
        default="benchmark",
        choices=list(STEPS),
        help="train_throughput.py's AdamW step (default), or the runner's own (hgrn_jax.training)",
    )
    parser.add_argument("--measured", type=Path, help="train_throughput JSON of measured steps")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = parser.parse_args()
    if args.scan == "2d" and (
        args.task != "lra" or any(math.isqrt(n) ** 2 != n for n in args.lengths)
    ):
        parser.error("--scan 2d is the LRA classifier's 2-D mixer: --task lra, square lengths")
    args.batch = args.batch or (8 if args.task == "lm" else 32)
    args.dtype = None if args.dtype == "float32" else jnp.bfloat16
    device = gpu_device()
    rows: list[dict] = []
    failed: list[str] = []
    for length in args.lengths:
        rows += compile_rows(args, device, length, failed)
    if not rows:
        sys.exit("gpu_compile.py: no row compiled (see the errors above)")
    # The H200 timed train_throughput's step of the 1-D classifier only: a 2-D or runner row has
    # no measured twin by default.
    timed = args.scan == "1d" and args.step == "benchmark"
    measured = args.measured or (default_measured(args) if timed else None)
    fit = add_measured(rows, measured, args.task) if measured else None
    print(format_table(rows, TABLE_COLUMNS))
    if fit:
        bandwidth = fit["bandwidth_TBps"]
        print(
            f"fit over {fit['rows']} measured rows without Pallas kernels: "
            + (f"{bandwidth:.2f} TB/s effective, " if bandwidth else "no bandwidth term, ")
            + f"{fit['per_kernel_us']:.2f} us per kernel, largest residual "
            f"{fit['largest_residual']:+.0%} (a reading, not a timing)"
        )
    print_sites(rows)
    name = (
        "gpu_compile"
        + ("_full" if args.full else "")
        + ("_lra" if args.task == "lra" else "")
        + ("_2d" if args.scan == "2d" else "")
        + ("_runner" if args.step == "runner" else "")
    )
    meta = {
        "target": "NVIDIA H200 (sm_90), deviceless: compiled, not run",
        "task": args.task,
        "scan": args.scan,
        "batch": args.batch,
        "dtype": "float32" if args.dtype is None else "bfloat16",
        "step": args.step,
        **({"runner_optimizer": RUNNER_OPTIMIZER} if args.step == "runner" else {}),
        "variants": {v: list(throughput.VARIANTS[v]) for v in args.variants},
        "fit": fit,
        "failed": failed,
    }
    print("wrote", write_results(name + args.tag, rows, meta))
    if failed:
        sys.exit(f"gpu_compile.py: {len(failed)} rows did not compile for the GPU: {failed}")


if __name__ == "__main__":
    main()
