"""Make the golden cases ``official_hgrn2_bi1d``, ``official_hgrn2_2d`` and
``official_hgrn2_2d_series`` (README.md, "HGRN2 cases").

They run hgru2-pytorch's ``BiHgru2_1d``, ``Hgru2_2d_parallel`` and ``Hgru2_2d_series`` unmodified,
on CPU, in float64, from a checkout of the repository given on the command line (nothing of it is
copied here):

    git clone https://github.com/Doraemonzzz/hgru2-pytorch /tmp/hgru2-pytorch
    git -C /tmp/hgru2-pytorch checkout caf92f0d8f31
    python tests/golden/generate_hgrn2_bi2d.py /tmp/hgru2-pytorch --commit caf92f0d8f31...

``--cases`` makes only the named cases (``official_hgrn2_2d_series`` was added later, by
``--cases official_hgrn2_2d_series``, leaving the other two files as they were).

Needs torch, einops, numpy and triton (imported by the package's modules; no Triton kernel runs).
This is no part of the project's environment: run it from a separate one.

Two things are replaced, and the JSON says so:

* ``hgru_real_cuda`` (the CUDA extension behind ``HgruRealFunction``, the only compiled code on
  these paths) by a PyTorch loop that follows ``hgru_real_forward_kernel``: per (batch, channel),
  ``h = lambda[t] * h + x[t]`` from ``h = 0``, reading the (n, b, d) input in its memory order,
  so the stub insists on contiguous inputs as the kernel silently assumes.
* the package's ``__init__``, which only registers its Hugging Face model with ``transformers``:
  ``hgru2_pytorch`` is entered as a namespace on the checkout, so that ``transformers`` is not
  needed. ``hgru2_pytorch.modules`` is imported as written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import einops
import numpy as np
import torch

SEED = 20240925
D, EXPAND, LENGTH, GRID, BATCH = 32, 8, 37, (5, 7), 2
SCAN_CALLS: list[tuple[tuple[int, ...], str]] = []
CONSTRUCTOR = dict(
    embed_dim=D,
    expand_ratio=EXPAND,
    act_fun="silu",
    uv_act_fun="sigmoid",
    use_norm=True,
    bias=True,
    norm_type="layernorm",
)
SERIES_COMPUTES = (
    "compute() is BiHgru2_1d.forward_lesshead line for line (parameters and gates of Hgru2_1d: "
    "v = silu(u), q = sigmoid(o), lam = lb + (1-lb)*sigmoid(f), k = 1-lam; a forward and a "
    "reverse scan, states summed, read out with q, out_proj(LayerNorm(.))). forward() runs it "
    "along H on (H, W*B, d) (each column), rearranges its output to (W, H*B, d) and runs the same "
    "compute, same weights and lower bound, along W (each row): y = L_W(L_H(x))."
)


def real_scan(x: torch.Tensor, lambda_: torch.Tensor) -> torch.Tensor:
    """``hgru_real_cuda.forward``: x, lambda_ (n, b, d) contiguous -> h (n, b, d)."""
    if x.shape != lambda_.shape or x.dim() != 3:
        raise ValueError(f"scan inputs {tuple(x.shape)} and {tuple(lambda_.shape)}")
    if not (x.is_contiguous() and lambda_.is_contiguous()):
        raise ValueError("the CUDA kernel reads its inputs as contiguous (n, b, d) arrays")
    SCAN_CALLS.append((tuple(x.shape), str(x.dtype)))
    output = torch.zeros_like(x)
    hidden = torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        hidden = lambda_[t] * hidden + x[t]
        output[t] = hidden
    return output


def load_reference(checkout: Path) -> types.ModuleType:
    """``hgru2_pytorch.modules`` from ``checkout``, with the scan stub in place."""
    sys.modules["hgru_real_cuda"] = types.SimpleNamespace(forward=real_scan)
    package = types.ModuleType("hgru2_pytorch")
    package.__path__ = [str(checkout / "hgru2_pytorch")]
    sys.modules["hgru2_pytorch"] = package
    import hgru2_pytorch.modules as modules

    return modules


def seeded_parameters(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter overwritten: weights N(0, 1) * 1.5 / sqrt(fan_in), biases 0.3 N, the norm's
    weight 1 + 0.3 N and bias 0.2 N."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if name == "norm.weight":
                p.copy_(1 + 0.3 * noise)
            elif name == "norm.bias":
                p.copy_(0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise * 1.5 / p.shape[1] ** 0.5)


# ---------------------------------------------------------------- independent numpy reference


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _scan_states(k, v, lam, axis: int, reverse: bool) -> np.ndarray:
    """States S[..., h, i, j] of S_t = lam_t[i] S_{t-1} + k_t[i] v_t[j] along ``axis``."""
    k, v, lam = (np.moveaxis(a, axis, 0) for a in (k, v, lam))
    order = range(k.shape[0] - 1, -1, -1) if reverse else range(k.shape[0])
    state = np.zeros(k.shape[1:] + (v.shape[-1],))
    states = np.zeros_like(np.broadcast_to(state, (k.shape[0],) + state.shape))
    for t in order:
        state = lam[t][..., None] * state + k[t][..., None] * v[t][..., None, :]
        states[t] = state
    return np.moveaxis(states, 0, axis)


def numpy_reference(params: dict, x: np.ndarray, bound: np.ndarray, axes: tuple[int, ...]):
    """The layer from README.md's maths: forward and reverse scans along each of ``axes``."""
    u, a, f = np.split(x @ params["in_proj.weight"].T + params["in_proj.bias"], 3, axis=-1)
    heads = lambda z: z.reshape(z.shape[:-1] + (-1, EXPAND))
    lam = heads(bound + (1 - bound) * _sigmoid(f))
    v, q = heads(u * _sigmoid(u)), heads(_sigmoid(a))
    state = sum(
        _scan_states(1 - lam, v, lam, axis, reverse) for axis in axes for reverse in (False, True)
    )
    o = np.einsum("...hij,...hi->...hj", state, q).reshape(x.shape)
    mean, var = o.mean(-1, keepdims=True), o.var(-1, keepdims=True)
    o = (o - mean) / np.sqrt(var + 1e-5) * params["norm.weight"] + params["norm.bias"]
    return o @ params["out_proj.weight"].T + params["out_proj.bias"]


def numpy_series(params: dict, x: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """``Hgru2_2d_series`` from README.md's maths: the 1-D bidirectional layer along H (axis 0),
    then the same layer along W (axis 1) on its output."""
    return numpy_reference(params, numpy_reference(params, x, bound, (0,)), bound, (1,))


def bihgru2_1d_twice(modules, module: torch.nn.Module, x: torch.Tensor, bound) -> torch.Tensor:
    """``BiHgru2_1d`` holding ``module``'s weights, run along H on (H, W*B, d), then along W on
    (W, H*B, d): what ``Hgru2_2d_series`` should be if its ``compute`` is ``forward_lesshead``."""
    h, w, b, d = x.shape
    one = modules.BiHgru2_1d(**CONSTRUCTOR).double().eval()
    one.load_state_dict(module.state_dict())
    y = one(x.reshape(h, w * b, d), bound).reshape(h, w, b, d)
    y = one(y.transpose(0, 1).reshape(w, h * b, d).contiguous(), bound)
    return y.reshape(w, h, b, d).transpose(0, 1)


# ---------------------------------------------------------------- one case


def make_case(modules, class_name: str, constructor: dict, shape: tuple, seed: int, commit: str):
    generator = torch.Generator().manual_seed(seed)
    module = getattr(modules, class_name)(**constructor).double().eval()
    seeded_parameters(module, generator)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    bound = 0.05 + 0.85 * torch.rand(D, generator=generator, dtype=torch.float64)
    grid = len(shape) == 4
    series = class_name == "Hgru2_2d_series"
    scans = 4 if grid else 2

    with torch.no_grad():
        SCAN_CALLS.clear()
        output = module(x, bound)
        calls = list(SCAN_CALLS)
        default_bound_error = None
        if series:  # its default bound, python 0, becomes zeros_like(x) (H, W, B, d)
            try:
                module(x)
            except RuntimeError as error:
                default_bound_error = f"{type(error).__name__}: {error}"
            lb0 = module(x, torch.zeros(D, dtype=torch.float64))
        else:
            lb0 = module(x)
        params = {k: v.numpy().copy() for k, v in module.state_dict().items()}
        arrays = {"input": x.numpy(), "lower_bound": bound.numpy()}
        arrays |= {f"param/{k}": v for k, v in params.items()}
        arrays |= {"output": output.numpy(), "output/lb0": lb0.numpy()}

        axes = (0, 1) if grid else (0,)
        xs, bs = x.numpy(), bound.numpy()
        if series:
            ours = lambda b: numpy_series(params, xs, b)
        else:
            ours = lambda b: numpy_reference(params, xs, b, axes)
        sanity: dict = {
            "scan_calls_per_forward": len(calls),
            "scan_calls": calls,
            "numpy_reference_maxabs": float(np.abs(ours(bs) - arrays["output"]).max()),
            "numpy_reference_lb0_maxabs": float(np.abs(ours(0.0) - arrays["output/lb0"]).max()),
            "output_maxabs": float(output.abs().max()),
            "lb_effect_maxabs": float((output - lb0).abs().max()),
        }
        assert len(calls) == scans, calls

        rebuilt = getattr(modules, class_name)(**constructor).double().eval()
        rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        sanity["rebuild_float64_maxabs"] = float((rebuilt(x, bound) - output).abs().max())
        low = rebuilt.float()(x.float(), bound.float()).double()
        sanity["rebuild_float32_maxabs"] = float((low - output).abs().max())
        sanity["rebuild_float32_relative_to_output_maxabs"] = (
            sanity["rebuild_float32_maxabs"] / sanity["output_maxabs"]
        )

        if grid:
            cell = (2, 3)
            moved = x.clone()
            moved[cell] += 1.0
            changed = (module(moved, bound) - output).abs().amax(dim=(2, 3)) > 0
            if series:  # the column, then every row through it: the whole grid
                sanity["perturb_cell"] = {
                    "cell": list(cell),
                    "changed_cells_count": int(changed.sum()),
                    "every_cell_changed": bool(changed.all()),
                }
            else:
                expected = torch.zeros_like(changed)
                expected[cell[0], :] = expected[:, cell[1]] = True
                sanity["perturb_cell"] = {
                    "cell": list(cell),
                    "changed_cells": changed.nonzero().tolist(),
                    "matches_expected_cross_pattern": bool(torch.equal(changed, expected)),
                }
            # Hgru2_2d_parallel's four scans treat H and W alike, so a transposed grid gives the
            # transposed output: only the non-square shape can catch swapped axes. The series
            # layer runs H first, so transposing changes its output.
            swapped = module(x.transpose(0, 1).contiguous(), bound).transpose(0, 1)
            sanity["transposed_grid_maxabs_change"] = float((swapped - output).abs().max())
            if series:
                sanity["default_lower_bound_error"] = default_bound_error
                sanity["cross_checks"] = {
                    "maxabs_vs_BiHgru2_1d_along_H_then_W_same_weights": float(
                        (bihgru2_1d_twice(modules, module, x, bound) - output).abs().max()
                    )
                }
        else:
            t0 = shape[0] // 2
            later = x.clone()
            later[t0 + 1 :] += 1.0
            change = (module(later, bound) - output).abs()
            sanity["perturb_after_t0"] = {
                "t0": t0,
                "maxabs_change_at_or_before_t0": float(change[: t0 + 1].max()),
                "maxabs_change_after_t0": float(change[t0 + 1 :].max()),
            }
            causal = modules.Hgru2_1d(**constructor).double().eval()
            causal.load_state_dict(module.state_dict())
            sanity["cross_checks"] = {
                "maxabs_vs_causal_Hgru2_1d_same_weights": float(
                    (causal(x, bound) - output).abs().max()
                )
            }
        row1 = x.clone()
        row1[..., 1, :] += 1.0
        change = (module(row1, bound) - output).abs()
        sanity["batch0_change_when_batch1_perturbed"] = float(change[..., 0, :].max())
        sanity["batch1_change_when_batch1_perturbed"] = float(change[..., 1, :].max())

    file = {
        "BiHgru2_1d": "bihgru2_1d",
        "Hgru2_2d_parallel": "hgru2_2d_parallel",
        "Hgru2_2d_series": "hgru2_2d_series",
    }[class_name]
    layout = (
        "grid-major (H, W, b, d): input[row, col, batch, channel]; axis 0 = H (rows), axis 1 = W"
        if grid
        else "time-major (n, b, d): input[t, batch, channel]"
    )
    meta = {
        "source": {
            "repo": "Doraemonzzz/hgru2-pytorch",
            "commit": commit,
            "file": f"hgru2_pytorch/modules/{file}.py",
            "class": class_name,
            "method": (
                "forward(x, lower_bound)"
                if grid
                else "forward_lesshead(x, lower_bound) (the constructor binds self.forward = "
                "self.forward_lesshead because expand_ratio < 16; in eval the other path casts "
                "to float32 and runs Triton)"
            ),
            "scan": "HgruRealFunction.apply -> hgru_real_cuda.forward, where hgru_real_cuda was "
            "replaced (sys.modules stub) by a pure-PyTorch transcription of "
            "hgru_real_forward_kernel in hgru2_pytorch/hgru_real_cuda/hgru_real_cuda_kernel.cu "
            "(h = lambda*h + x, h starts at 0; the stub checks its inputs are contiguous, as the "
            "kernel assumes); no CUDA/Triton code ran",
            "package_init": "hgru2_pytorch/__init__.py (which imports transformers to register the "
            "HF model) was bypassed by entering hgru2_pytorch as a namespace package; "
            "hgru2_pytorch.modules was imported unmodified",
            "generator": "tests/golden/generate_hgrn2_bi2d.py",
        },
        "constructor": constructor,
        "derived": {
            "num_heads": D // EXPAND,
            "head_k_dim": EXPAND,
            "head_v_dim": EXPAND,
            "scans": (
                "pass 1 along H: forward, reverse; pass 2 along W: forward, reverse"
                if series
                else "H forward, H reverse, W forward, W reverse"
                if grid
                else "forward, reverse"
            ),
        },
        "computes": SERIES_COMPUTES
        if series
        else (
            "HGRN2 with the parameters and gates of Hgru2_1d (official_hgrn2_1d): v = silu(u), "
            "q = sigmoid(o), lam = lb + (1-lb)*sigmoid(f), k = 1-lam; the same q, k, v, lam feed "
            + (
                "four scans: along H (each column) forward and reverse, along W (each row) "
                "forward and reverse"
                if grid
                else "a forward and a reverse scan (flip in time, scan, flip back)"
            )
            + "; their states are summed (both include the current token), read out with q, "
            "then out_proj(LayerNorm(.))."
        ),
        "call": (
            "output = module(input, lower_bound); output/lb0 = module(input, torch.zeros(d)) "
            "(the default, python 0 -> zeros_like(input) (H, W, B, d), does not broadcast "
            "against compute's (H, W*B, ...) gates: sanity.default_lower_bound_error)"
            if series
            else "output = module(input, lower_bound); output/lb0 = module(input) (lower_bound "
            "defaults to python 0 -> zeros_like(input))"
        ),
        "lower_bound": "per-channel float64 vector (d,), values 0.05 + 0.85*U(0,1); applied to "
        "the forget gate (key) channels",
        "input_layout": layout,
        "output_layout": "same as input",
        "dtype": "float64 (module.double(), float64 input and lower_bound)",
        "mode": "eval, torch.no_grad",
        "seed": seed,
        "param_init": "all parameters overwritten with seeded random values (torch.Generator: "
        "parameters in named_parameters order, then input, then lower_bound); norm.weight ~ "
        "1+0.3N, norm.bias ~ 0.2N, other biases ~ 0.3N, weights ~ N(0,1)*1.5/sqrt(fan_in)",
        "extra_outputs": {
            "output/lb0": "same weights and input, no lower bound (lam = sigmoid(f))"
            + (", given as a zero (d,) tensor" if series else "")
        },
        "sanity": sanity,
        "suggested_tolerance": "float64 port: atol 1e-10; float32 port: atol 5e-5, rtol 1e-5",
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
        "versions": {
            "torch": torch.__version__,
            "einops": einops.__version__,
            "numpy": np.__version__,
            "triton (import only, no kernel ran)": __import__("triton").__version__,
            "python": sys.version.split()[0],
        },
    }
    return arrays, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of Doraemonzzz/hgru2-pytorch")
    parser.add_argument(
        "--commit", help="the checkout's commit (default: git rev-parse HEAD in the checkout)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="another seed makes another set (2-D: seed + 1, series: seed + 2)",
    )
    parser.add_argument("--cases", nargs="+", help="make only these cases (default: all)")
    args = parser.parse_args()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(args.checkout), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    torch.set_num_threads(1)
    modules = load_reference(args.checkout.resolve())
    cases = {
        "official_hgrn2_bi1d": ("BiHgru2_1d", (LENGTH, BATCH, D), args.seed),
        "official_hgrn2_2d": ("Hgru2_2d_parallel", (*GRID, BATCH, D), args.seed + 1),
        "official_hgrn2_2d_series": ("Hgru2_2d_series", (*GRID, BATCH, D), args.seed + 2),
    }
    unknown = sorted(set(args.cases or ()) - set(cases))
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(cases)}")
    for name, (class_name, shape, seed) in cases.items():
        if args.cases and name not in args.cases:
            continue
        arrays, meta = make_case(modules, class_name, CONSTRUCTOR, shape, seed, commit)
        meta["case"] = name
        np.savez(args.out / f"{name}.npz", **arrays)
        (args.out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(name, json.dumps(meta["sanity"]))


if __name__ == "__main__":
    main()
