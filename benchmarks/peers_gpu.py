"""Our recurrence and fla-compatible layer against the fla library's Triton kernels, on one CUDA GPU.

    pip install flash-linear-attention==0.6.0 --no-deps    # on a machine with torch + triton
    python benchmarks/peers_gpu.py [--lengths 1024 4096 16384 65536] [--dtypes float32 bfloat16]
                                   [--methods sequential associative chunked pallas]
                                   [--layer-lengths 1024 4096 16384] [--reps 5]
                                   [--layer-methods pallas chunked] [--deadline SECONDS]
                                   [--max-sequential-length 16384] [--tag _h200]
    python benchmarks/peers_gpu.py --dry-run-jax             # our side only, tiny L, any backend

Kernels, (B, L, D) = (8, L, 512), the same data on both sides (fla takes the log gate g = log a):

- ours: ``linear_recurrence(a, x, method=m)`` for every method;
- fla: ``chunk_hgrn(x=x, g=g)`` and ``fused_recurrent_hgrn(x=x, g=g)`` (returning ``(o, final_state)``);

each ``forward`` and ``forward+backward`` (a VJP / ``autograd.grad`` with a fixed cotangent).
The floor is the bytes moved at least (forward: 3 arrays of B*L*D; forward+backward: 8) over the
best copy bandwidth measured in this run by a large device copy in PyTorch and in JAX.
Layer: our ``FlaHGRNAttention`` (weights converted from fla's) against ``fla.layers.HGRNAttention``
(hidden 1024, batch 8), forward+backward with respect to the input and every weight.
Before timing, outputs of both sides are compared on one shape (max relative error printed).
Results (rewritten after every row, so a run stopped early keeps what it measured):
``benchmarks/results/peers[TAG]_gpu.json`` (``--tag``, e.g. ``_h200``, keeps other machines' files).
``--deadline`` stops starting new shapes after that many
seconds; ``"sequential"`` (one step per loop iteration, a launch-bound loop on a GPU) is only
timed up to ``--max-sequential-length``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import format_table, time_fn, write_results
from benchmarks.recurrence import jax_passes
from hgrn_jax.ops import METHODS

BATCH, CHANNELS, LAYER_HIDDEN = 8, 512, 1024
LENGTHS, LAYER_LENGTHS = (1024, 4096, 16384, 65536), (1024, 4096, 16384)
ARRAYS = {"forward": 3, "forward+backward": 8}
COPY_BYTES = 1 << 30
FLA_KERNELS = ("fla_chunk", "fla_fused_recurrent")
HOW_TO_RUN = (
    "run it on a CUDA machine with torch + triton and jax[cuda]: "
    "pip install flash-linear-attention==0.6.0 --no-deps && python benchmarks/peers_gpu.py"
)


def missing_requirements() -> list[str]:
    """What this machine lacks for the GPU comparison (empty when everything is there)."""
    missing = []
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU visible to PyTorch")
    except ImportError:
        missing.append("torch")
    try:
        import fla.layers
        import fla.ops.hgrn  # noqa: F401
    except Exception as error:  # fla's import pulls in triton, einops, transformers
        missing.append(f"fla ({type(error).__name__}: {error})")
    if jax.default_backend() != "gpu":
        missing.append(f"a JAX GPU backend (JAX runs on {jax.default_backend()})")
    return missing


def time_torch(fn: Callable[[], Any], reps: int) -> float:
    """Median wall-clock seconds of ``fn()`` on the GPU, synchronising around each call."""
    import torch

    fn()  # warm-up: Triton autotuning and compilation
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidths(reps: int, with_torch: bool, nbytes: int = COPY_BYTES) -> dict[str, float]:
    """Bytes per second of a large device copy (read once, write once), in JAX and PyTorch."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    result = {"jax": 2 * nbytes / time_fn(jax.jit(lambda v: v + 1.0), x, reps=reps)["min"]}
    del x
    if with_torch:
        import torch

        src = torch.ones(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        result["torch"] = 2 * nbytes / time_torch(lambda: dst.copy_(src), reps)
        del src, dst
    return result


def kernel_inputs(length: int, dtype_name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 host arrays ``a`` in (0.9, 1), ``x`` and cotangent ``dy``, shaped (B, L, D)."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, length, CHANNELS)
    a = rng.uniform(0.9, 1.0, shape).astype(np.float32)
    # Round to the benchmark dtype once so both sides see the same numbers.
    a = np.asarray(jnp.asarray(a, dtype_name).astype(jnp.float32))
    return {
        "a": a,
        "x": rng.standard_normal(shape, np.float32),
        "dy": rng.standard_normal(shape, np.float32),
    }


def to_torch(array: np.ndarray, dtype_name: str):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).cuda().to(getattr(torch, dtype_name))


def fla_kernel_passes(name: str, x, g, dy) -> dict[str, Callable[[], Any]]:
    import torch
    from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn

    kernel = chunk_hgrn if name == "fla_chunk" else fused_recurrent_hgrn

    def forward():
        with torch.no_grad():
            return kernel(x=x, g=g)[0]

    def forward_backward():
        x_, g_ = x.detach().requires_grad_(), g.detach().requires_grad_()
        return torch.autograd.grad(kernel(x=x_, g=g_)[0], (x_, g_), dy)

    return {"forward": forward, "forward+backward": forward_backward}


def max_relative_error(ours: Any, theirs: Any) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def check_kernels(methods: list[str], length: int = 1024) -> None:
    """Print the max relative error of every method against each fla kernel (float32)."""
    data = kernel_inputs(length, "float32")
    a, x = jnp.asarray(data["a"]), jnp.asarray(data["x"])
    tx, tg = to_torch(data["x"], "float32"), to_torch(np.log(data["a"]), "float32")
    theirs = {
        name: fla_kernel_passes(name, tx, tg, None)["forward"]().float().cpu().numpy()
        for name in FLA_KERNELS
    }
    for method in methods:
        try:
            ours = jax_passes(method)["forward"](a, x)
        except Exception as error:  # report and go on: one broken method must not stop the run
            print(
                f"check L={length} float32 {method}: FAILED {type(error).__name__}: {error}",
                flush=True,
            )
            continue
        errors = ", ".join(
            f"{name} {max_relative_error(ours, o):.2e}" for name, o in theirs.items()
        )
        print(f"check L={length} float32 {method}: max relative error vs {errors}", flush=True)


def our_layer(hidden: int, dtype_name: str, state_dict: dict[str, np.ndarray] | None):
    """Our FlaHGRNAttention (first layer: no lower bound), from fla's weights when given."""
    from hgrn_jax.convert import from_fla_hgrn_attention
    from hgrn_jax.nn import FlaHGRNAttention

    dtype = jnp.dtype(dtype_name)
    if state_dict is None:
        return FlaHGRNAttention(hidden, use_lower_bound=False, param_dtype=dtype, rngs=nnx.Rngs(0))
    constructor = {"hidden_size": hidden, "expand_ratio": 1, "layer_idx": 0}
    return from_fla_hgrn_attention(constructor, state_dict, dtype)


def our_layer_passes(layer, method: str) -> dict[str, Callable]:
    layer.method = method
    graphdef, params = nnx.split(layer)

    def forward(params, x):
        return nnx.merge(graphdef, params)(x)

    def forward_backward(params, x, dy):
        return jax.vjp(forward, params, x)[1](dy)

    fwd, fwd_bwd = jax.jit(forward), jax.jit(forward_backward)
    return {
        "forward": lambda x: fwd(params, x),
        "forward+backward": lambda x, dy: fwd_bwd(params, x, dy),
    }


def fla_layer(hidden: int, dtype_name: str, mode: str):
    import torch
    from fla.layers import HGRNAttention

    torch.manual_seed(0)
    return (
        HGRNAttention(mode=mode, hidden_size=hidden, layer_idx=0)
        .cuda()
        .to(getattr(torch, dtype_name))
    )


def fla_layer_passes(layer, x, dy) -> dict[str, Callable[[], Any]]:
    import torch

    weights = list(layer.parameters())

    def forward():
        with torch.no_grad():
            return layer(x)[0]

    def forward_backward():
        x_ = x.detach().requires_grad_()
        return torch.autograd.grad(layer(x_)[0], [x_, *weights], dy)

    return {"forward": forward, "forward+backward": forward_backward}


def state_dict_of(layer) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in layer.state_dict().items()}


def check_layer(length: int = 1024) -> None:
    """Print the max relative error of our layer (fla's weights) against fla's, float32."""
    import torch

    theirs = fla_layer(LAYER_HIDDEN, "float32", "chunk")
    ours = our_layer(LAYER_HIDDEN, "float32", state_dict_of(theirs))
    x = np.random.default_rng(1).standard_normal((BATCH, length, LAYER_HIDDEN), np.float32)
    with torch.no_grad():
        expected = theirs(to_torch(x, "float32"))[0].cpu().numpy()
    error = max_relative_error(ours(jnp.asarray(x)), expected)
    print(f"check layer L={length} float32: max relative error vs fla {error:.2e}", flush=True)


def timed(timer: Callable, *args: Any, **kwargs: Any) -> float | None:
    """``timer(*args)`` in seconds (its median when it returns a dict), or None, after
    printing the error, when the timed function fails: one broken implementation must not stop
    the rest of the run."""
    try:
        result = timer(*args, **kwargs)
    except Exception as error:
        print(f"FAILED {type(error).__name__}: {str(error)[:2000]}", flush=True)
        return None
    return result["median"] if isinstance(result, dict) else result


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x_fla_best``: each row's time over the best fla time at the same test point."""
    best: dict[tuple, float] = {}
    for row in rows:
        if row["impl"].startswith("fla"):
            key = (row["bench"], row["dtype"], row["length"], row["pass"])
            best[key] = min(best.get(key, np.inf), row["ms"])
    for row in rows:
        key = (row["bench"], row["dtype"], row["length"], row["pass"])
        row["x_fla_best"] = row["ms"] / best[key] if key in best else None


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests/test_gpu_session.py, which checks
    benchmarks/gpu_session.sh's flags against it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--layer-lengths", type=int, nargs="+", default=list(LAYER_LENGTHS))
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"]
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--layer-methods", nargs="+", default=["pallas", "chunked"], choices=list(METHODS)
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--deadline",
        type=float,
        default=float("inf"),
        help="seconds after which no new shape is started",
    )
    parser.add_argument("--max-sequential-length", type=int, default=16384)
    parser.add_argument(
        "--torch-tf32",
        action="store_true",
        help="let PyTorch use TF32 for float32 matmuls, as JAX does by default "
        "on GPU (without it, float32 layer rows compare TF32 with float32)",
    )
    parser.add_argument(
        "--dry-run-jax",
        action="store_true",
        help="time only our side at tiny lengths on any backend; write nothing",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file name, e.g. '_h200'")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    with_peers = not args.dry_run_jax
    if with_peers and (missing := missing_requirements()):
        print(f"peers_gpu: skipped, missing {'; '.join(missing)}. To measure, {HOW_TO_RUN}")
        return
    if with_peers and args.torch_tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.dry_run_jax:
        args.lengths, args.layer_lengths, args.reps = [256], [128], 1
    else:
        check_kernels(args.methods)
        check_layer()

    started = time.perf_counter()

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.deadline

    bandwidths = copy_bandwidths(args.reps, with_peers, COPY_BYTES if with_peers else 1 << 26)
    bandwidth = max(bandwidths.values())
    print("copy bandwidth GB/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in bandwidths.items()))
    rows: list[dict[str, Any]] = []

    def add(
        bench: str,
        impl: str,
        dtype_name: str,
        length: int,
        pass_name: str,
        seconds: float,
        floor_bytes: int | None,
    ) -> None:
        row = {
            "bench": bench,
            "impl": impl,
            "dtype": dtype_name,
            "length": length,
            "pass": pass_name,
            "ms": seconds * 1e3,
            "floor_ms": None,
            "x_floor": None,
        }
        if floor_bytes is not None:
            row["floor_ms"] = floor_bytes / bandwidth * 1e3
            row["x_floor"] = seconds * 1e3 / row["floor_ms"]
        rows.append(row)
        print(format_table([row], list(row)).splitlines()[-1], flush=True)
        if with_peers:
            add_ratios(rows)
            write_results("peers" + args.tag, rows, meta)

    meta = {
        "batch": BATCH,
        "channels": CHANNELS,
        "layer_hidden": LAYER_HIDDEN,
        "copy_bandwidth_GBps": {k: v / 1e9 for k, v in bandwidths.items()},
        "floor": "(3 forward [+ 5 backward]) * B*L*D*itemsize / best copy bandwidth",
        "torch_tf32": bool(args.torch_tf32),
    }
    if with_peers:
        import fla
        import torch

        meta.update(
            fla=getattr(fla, "__version__", "?"),
            torch=torch.__version__,
            gpu=torch.cuda.get_device_name(),
        )

    for dtype_name in args.dtypes:
        itemsize = jnp.dtype(dtype_name).itemsize
        for length in args.lengths:
            if out_of_time():
                print(f"deadline: skipping kernels at {dtype_name} L={length}", flush=True)
                continue
            data = kernel_inputs(length, dtype_name)
            a, x, dy = (jnp.asarray(data[k], dtype_name) for k in ("a", "x", "dy"))
            arrays_bytes = BATCH * length * CHANNELS * itemsize
            for method in args.methods:
                if method == "sequential" and length > args.max_sequential_length:
                    continue
                for pass_name, fn in jax_passes(method).items():
                    inputs = (a, x) if pass_name == "forward" else (a, x, dy)
                    seconds = timed(time_fn, fn, *inputs, reps=args.reps)
                    if seconds is not None:
                        add(
                            "kernel",
                            method,
                            dtype_name,
                            length,
                            pass_name,
                            seconds,
                            ARRAYS[pass_name] * arrays_bytes,
                        )
            del a, x, dy
            if with_peers:
                tx, tdy = to_torch(data["x"], dtype_name), to_torch(data["dy"], dtype_name)
                tg = to_torch(np.log(data["a"]), dtype_name)
                for name in FLA_KERNELS:
                    for pass_name, fn in fla_kernel_passes(name, tx, tg, tdy).items():
                        seconds = timed(time_torch, fn, args.reps)
                        if seconds is not None:
                            add(
                                "kernel",
                                name,
                                dtype_name,
                                length,
                                pass_name,
                                seconds,
                                ARRAYS[pass_name] * arrays_bytes,
                            )
                del tx, tg, tdy

        hidden = LAYER_HIDDEN if with_peers else 64
        theirs = (
            {mode: fla_layer(hidden, dtype_name, mode) for mode in ("chunk", "fused_recurrent")}
            if with_peers
            else {}
        )
        ours = our_layer(hidden, dtype_name, state_dict_of(theirs["chunk"]) if with_peers else None)
        for length in args.layer_lengths:
            if out_of_time():
                print(f"deadline: skipping the layer at {dtype_name} L={length}", flush=True)
                continue
            rng = np.random.default_rng(length)
            x = rng.standard_normal((BATCH, length, hidden), np.float32)
            dy = rng.standard_normal((BATCH, length, hidden), np.float32)
            jx, jdy = jnp.asarray(x, dtype_name), jnp.asarray(dy, dtype_name)
            for method in args.layer_methods:
                passes = our_layer_passes(ours, method)
                seconds = timed(time_fn, passes["forward+backward"], jx, jdy, reps=args.reps)
                if seconds is not None:
                    add("layer", method, dtype_name, length, "forward+backward", seconds, None)
            del jx, jdy
            if with_peers:
                tx, tdy = to_torch(x, dtype_name), to_torch(dy, dtype_name)
                for mode, layer in theirs.items():
                    fn = fla_layer_passes(layer, tx, tdy)["forward+backward"]
                    seconds = timed(time_torch, fn, args.reps)
                    if seconds is not None:
                        add(
                            "layer",
                            f"fla_{mode}",
                            dtype_name,
                            length,
                            "forward+backward",
                            seconds,
                            None,
                        )
                del tx, tdy

    add_ratios(rows)
    print(
        format_table(
            rows,
            ["bench", "impl", "dtype", "length", "pass", "ms", "floor_ms", "x_floor", "x_fla_best"],
        )
    )
    if args.dry_run_jax:
        print("dry run: nothing written")
        return
    print("wrote", write_results("peers" + args.tag, rows, meta))


if __name__ == "__main__":
    main()
