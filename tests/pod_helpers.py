"""Helpers of the simulated-pod tests: run ``experiments.launch``, build a config in this process,
read a run's checkpointed arrays, and compare them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "pods.md"


def launcher_env(**extra: str) -> dict[str, str]:
    """This environment on CPU with the repository importable (the launcher drops a simulated
    device count from ``XLA_FLAGS`` and sets each process's own; other flags pass), plus
    ``extra``."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


class Launch:
    """``python -m experiments.launch`` in the background, its output in files."""

    def __init__(
        self,
        folder: Path,
        num_processes: int,
        devices_per_process: int,
        args: list[str],
        name: str = "launch",
        env: dict[str, str] | None = None,
    ):
        folder.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = folder / f"{name}.out", folder / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.launch",
                f"--num_processes={num_processes}",
                f"--devices_per_process={devices_per_process}",
                "--",
                *args,
            ],
            cwd=REPO,
            env=launcher_env(**(env or {})),
            stdout=self._out,
            stderr=self._err,
            text=True,
        )

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Wait until the launcher's stderr matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.stderr, re.MULTILINE)
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no {pattern!r} in the launcher's stderr:\n{self.stderr[-4000:]}")

    def pids(self) -> dict[int, int]:
        found = self.wait_for(r"pids ((?:\d+=\d+(?:, )?)+)", 60)
        return {int(i): int(p) for i, p in (item.split("=") for item in found[1].split(", "))}

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the launch did not finish in {timeout} s:\n{self.stderr[-4000:]}"
            ) from None
        finally:
            self._out.close()
            self._err.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the launcher stops its processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_launch(
    folder: Path,
    num_processes: int,
    devices_per_process: int,
    args: list[str],
    *,
    timeout: float = 600,
    name: str = "launch",
    expect: int | None = 0,
    env: dict[str, str] | None = None,
) -> Launch:
    launch = Launch(folder, num_processes, devices_per_process, args, name, env)
    code = launch.wait(timeout)
    if expect is not None:
        assert code == expect, f"launcher exit {code}:\n{launch.stderr[-6000:]}"
    return launch


def process_lines(text: str, index: int) -> list[str]:
    """The lines process ``index`` printed (without the ``[index] `` prefix)."""
    prefix = f"[{index}] "
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


def docs_local_command() -> list[str]:
    """The local pod command of docs/pods.md (the block after ``<!-- local-pod-command -->``),
    as arguments after ``python -m experiments.launch``'s own flags and ``--``."""
    text = DOCS.read_text()
    block = re.search(r"<!-- local-pod-command -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "docs/pods.md lost its <!-- local-pod-command --> block"
    words = shlex.split(block[1].replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "experiments.launch"], words
    cut = words.index("--")
    return words[3:cut], words[cut + 1 :]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``--flag=...`` replaced (or added) by ``--flag=value``."""
    return [a for a in args if not a.startswith(f"--{flag}=")] + [f"--{flag}={value}"]


def load_config(spec: str, overrides: list[str]):
    """``--config=spec`` plus ``--config.key=value`` overrides, built in this process."""
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("pod_config", REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset or None)
    for override in overrides:
        key, _, value = override[len("--config.") :].partition("=")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = type(node[leaf])(
            json.loads(value) if not isinstance(node[leaf], str) else value
        )
    return config


def truncate_run(source: Path, target: Path, step: int) -> Path:
    """A copy of run ``source`` as it was when checkpoint ``step`` was its newest (later
    checkpoints and results dropped), like a run preempted right after that checkpoint."""
    shutil.copytree(source, target)
    for folder in (target / "checkpoints").iterdir():
        if folder.name.isdigit() and int(folder.name) > step:
            shutil.rmtree(folder)
    (target / "results.json").unlink(missing_ok=True)
    return target


def flat_arrays(tree) -> dict[str, np.ndarray]:
    """``{"a/b/0/value": array}`` for every leaf of ``tree``, whatever its containers (dicts,
    dataclasses, nnx states) so that a train state and its restored checkpoint compare by name."""

    def name(entry) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    return {
        "/".join(name(e) for e in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def checkpoint_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of checkpoint ``step`` (written by any number of processes) as numpy."""
    import orbax.checkpoint as ocp

    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(
        getattr(metadata, "item_metadata", metadata),
        "tree",
        getattr(metadata, "item_metadata", metadata),
    )
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), tree
    )
    return flat_arrays(checkpointer.restore(path, target))


# Directions the loss cannot see: a bias added just before a BatchNorm (the norm subtracts the
# batch mean; every norm of the tiny LRA models is a sync BatchNorm after the residual stream) has
# a zero true gradient, so its Adam moments hold rounding noise (~1e-9) whose sign depends on the
# reduction order, and Adam turns that into lr-sized steps; the BatchNorm running means follow.
GAUGE = re.compile(r"(down_proj|out_proj)/bias|/mean/")


def param_diffs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Per float array ``max|a - b| / max|b|``; integer arrays (counters, keys) must be equal."""
    assert a.keys() == b.keys()
    out = {}
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if not np.issubdtype(y.dtype, np.floating):
            np.testing.assert_array_equal(x, y, err_msg=key)
        elif y.size:
            out[key] = float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-30)
    return out


def max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest :func:`param_diffs` outside the :data:`GAUGE` directions."""
    return max((d for k, d in param_diffs(a, b).items() if not GAUGE.search(k)), default=0.0)


def gauge_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest absolute difference of the :data:`GAUGE` parameters (not moments)."""
    return max(
        (
            float(np.max(np.abs(a[k] - b[k])))
            for k in a
            if GAUGE.search(k) and k.startswith("params/")
        ),
        default=0.0,
    )


def train_records(workdir: Path, split: str = "train") -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]
