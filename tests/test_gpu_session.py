"""benchmarks/gpu_session.sh without a GPU: its Python commands are recorded by a stand-in
interpreter, so the order, flags and file handling of the time-to-accuracy steps are checked
before a lent machine's minutes are spent on them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"

# Records its arguments (not the environment's set-up: ``-c`` snippets, where fla is missing, and
# pip installing wheels from .whl/); as experiments.train it writes the three files of a run.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then
  case $2 in *"import fla"*) exit 1 ;; esac
  exit 0
fi
[ "$1 $2" = "-m pip" ] && exit 0
echo "$*" >> "$CALLS"
{ printf '%s\n' "$@"; echo '<end of call>'; } >> "$ARGV"
if [ "$1 $2" = "-m experiments.train" ]; then
  for arg in "$@"; do
    case $arg in --workdir=*) dir=${arg#--workdir=} ;; esac
  done
  mkdir -p "$dir"
  echo '{"task": "listops"}' > "$dir/results.json"
  echo '{}' > "$dir/config.json"
  echo '{"step": 1}' > "$dir/metrics.jsonl"
fi
"""


def _session(tmp_path: Path, **env: str) -> list[str]:
    """Run the script with the stand-in interpreter; the Python commands it ran, in order."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    (tmp_path / "argv.txt").write_text("")
    environment = {
        **os.environ,
        "PYTHON": str(fake),
        "CALLS": str(calls),
        "ARGV": str(tmp_path / "argv.txt"),
        "OUT": str(tmp_path / "out"),
        "TTA_DIR": str(tmp_path / "tta_runs"),
        "TTA_CACHE": str(tmp_path / "cache"),
        "TTA_WORK": str(tmp_path / "work"),
        "TTA_ONLY": "1",
        **env,
    }
    subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return calls.read_text().splitlines()


@pytest.mark.parametrize(
    "models, runs",
    [("hgrn", ["hgrn"]), ("", []), (None, ["hgrn", "transformer"])],
    ids=["one model", "data only", "default"],
)
def test_time_to_accuracy_steps(tmp_path, models, runs):
    env = {"TTA_MINUTES": "2"} | ({} if models is None else {"TTA_MODELS": models})
    calls = _session(tmp_path, **env)
    cache = tmp_path / "cache"
    assert calls[0] == f"-m hgrn_jax.data.listops --spec=lra --cache_dir={cache}"
    trains = [c for c in calls if c.startswith("-m experiments.train")]
    assert len(trains) == len(runs)
    for model, call in zip(runs, trains, strict=True):
        preset = ":transformer" if model == "transformer" else ""
        assert f"--config=experiments/configs/lra/listops.py{preset} " in call
        assert f"--config.data.cache_dir={cache} " in call
        assert "--config.data.source=generated" in call
        assert "--config.max_train_time_s=120 " in call
        kept = tmp_path / "tta_runs" / model
        assert json.loads((kept / "results.json").read_text()) == {"task": "listops"}
        assert (kept / "metrics.jsonl").is_file() and (kept / "config.json").is_file()
    plots = [c for c in calls if c.startswith("-m experiments.report")]
    if runs:
        assert plots == [
            f"-m experiments.report {tmp_path / 'tta_runs'} --x time "
            "--png benchmarks/results/listops_time_to_accuracy_gpu.png"
        ]
    else:
        assert plots == [] and not (tmp_path / "tta_runs").exists()


def test_no_time_to_accuracy_runs_nothing(tmp_path):
    assert _session(tmp_path, TTA_MINUTES="0") == []


def test_prepare_generates_the_data_and_checks_the_runner(tmp_path):
    calls = _session(tmp_path, TTA_MINUTES="0", TTA_PREPARE="1")
    cache, work = tmp_path / "cache", tmp_path / "work"
    # The data step runs in the background, beside the tiny run.
    assert sorted(calls) == [
        "-m experiments.train --config=experiments/configs/lra/listops.py:tiny "
        f"--workdir={work / 'tiny'} --config.data.source=generated --config.data.cache_dir={cache}",
        f"-m hgrn_jax.data.listops --spec=lra --cache_dir={cache}",
    ]


def test_seconds_override_minutes(tmp_path):
    calls = _session(tmp_path, TTA_MINUTES="8", TTA_SECONDS="90", TTA_MODELS="hgrn")
    (train,) = [c for c in calls if c.startswith("-m experiments.train")]
    assert "--config.max_train_time_s=90 " in train
    assert f"--workdir={tmp_path / 'work' / 'hgrn'} " in train


def test_whole_session_order(tmp_path):
    calls = _session(tmp_path, TTA_ONLY="0", TTA_SECONDS="60", TAG="_h200")
    scripts = [c.split()[0] for c in calls if c.startswith("benchmarks/")]
    assert scripts == [
        "benchmarks/pallas_gpu.py",
        "benchmarks/pallas_gpu.py",
        "benchmarks/matrix_recurrence.py",
        "benchmarks/train_throughput.py",
        "benchmarks/train_throughput.py",
        "benchmarks/device_time.py",
        "benchmarks/train_throughput.py",
    ]
    tagged = ("pallas_gpu", "throughput", "device_time")
    assert all("--tag _h200" in c for c in calls if any(name in c for name in tagged))
    # The data are generated while the GPU steps run; the models train after all of them.
    data = calls.index(f"-m hgrn_jax.data.listops --spec=lra --cache_dir={tmp_path / 'cache'}")
    trains = [i for i, c in enumerate(calls) if c.startswith("-m experiments.train")]
    last_gpu_step = max(i for i, c in enumerate(calls) if c.startswith("benchmarks/"))
    assert len(trains) == 2 and min(trains) > max(data, last_gpu_step)


def test_steps_pick_the_measurements(tmp_path):
    """STEPS splits the measurements over commands on a warm machine (the kernels first, then
    the training steps), with the kernel options timed beside the defaults in both; the Mosaic
    GPU kernels run in steps of their own, beside the default kernel, with their own files."""
    first = _session(tmp_path, TTA_ONLY="0", TTA_MINUTES="0", STEPS="pallas mosaic", TAG="_h")
    assert [c.split()[0] for c in first] == ["benchmarks/pallas_gpu.py"] * 2
    assert first[0].endswith("--tag _h") and "mosaic_gpu" not in first[0]
    assert "--variants default mosaic_gpu mosaic_gpu, auto barriers --sweep-base" in first[1]
    assert first[1].endswith("--tag _h_mosaic")
    second = _session(tmp_path, TTA_ONLY="0", TTA_MINUTES="0", STEPS="lm lra device")
    assert [c.split()[0] for c in second] == [
        "benchmarks/train_throughput.py",
        "benchmarks/train_throughput.py",
        "benchmarks/device_time.py",
    ]
    assert all("chained kernel" in c for c in second)


def test_benchmark_commands_parse_with_their_scripts_command_lines(tmp_path):
    """Every benchmark command of a whole session, arguments as bash passes them, parses with
    its script's own command line: a misspelt flag or variant would otherwise stop that step
    on a lent machine, minutes into its device time."""
    from benchmarks import device_time, matrix_recurrence, pallas_gpu, train_throughput

    _session(tmp_path, TTA_ONLY="0", TTA_MINUTES="0", TAG="_h200")
    text = (tmp_path / "argv.txt").read_text()
    commands = [call.strip("\n").split("\n") for call in text.split("<end of call>\n") if call]
    parsers = {
        f"benchmarks/{module.__name__.split('.')[-1]}.py": module.build_parser
        for module in (device_time, matrix_recurrence, pallas_gpu, train_throughput)
    }
    parsed = []
    for argv in commands:
        if argv[0] in parsers:
            args = parsers[argv[0]]().parse_args(argv[1:])
            parsed.append((argv[0], args))
    assert [script for script, _ in parsed] == [
        "benchmarks/pallas_gpu.py",
        "benchmarks/pallas_gpu.py",
        "benchmarks/matrix_recurrence.py",
        "benchmarks/train_throughput.py",
        "benchmarks/train_throughput.py",
        "benchmarks/device_time.py",
        "benchmarks/train_throughput.py",
    ]
    assert parsed[0][1].variants == pallas_gpu.DEFAULT_VARIANTS
    mosaic = parsed[1][1]
    assert mosaic.variants == ["default", "mosaic_gpu", "mosaic_gpu, auto barriers"]
    assert mosaic.sweep_base == "mosaic_gpu"
    assert pallas_gpu.sweep_options(mosaic.sweep_base)[0] == {"block_rows": 32}
    lra = parsed[4][1]
    assert lra.task == "lra" and "directions in two scans" in lra.variants
    mosaic_lra = parsed[6][1]
    assert mosaic_lra.task == "lra" and mosaic_lra.variants == ["after", "mosaic_gpu kernel"]
