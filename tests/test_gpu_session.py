"""benchmarks/gpu_session.sh without a GPU: its Python commands are recorded by a stand-in
interpreter, so the steps each command runs, their flags, time limits and the files that come
back are checked before a lent machine's minutes are spent on them. Also the benchmark scripts'
own handling of a failure midway (pallas_gpu.py, device_time.py) and their command lines."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"

# Records its arguments (not the environment's set-up: ``-c`` snippets, where fla is missing
# unless FLA=1, and pip installing wheels from .whl/). As a benchmark script it writes its JSON
# (named by its --tag) to $HGRN_BENCH_RESULTS; as experiments.train the three files of a run.
# SNAP_ON: a command containing it first copies $OUT/results.tar.gz to $SNAP (what a command
# killed there would bring back); FAIL_ON: a command containing it exits FAIL_RC (default 3).
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then
  case $2 in *"import fla"*) [ "${FLA:-0}" = 1 ] || exit 1 ;; esac
  exit 0
fi
[ "$1 $2" = "-m pip" ] && exit 0
echo "$*" >> "$CALLS"
{ printf '%s\\n' "$@"; echo '<end of call>'; } >> "$ARGV"
if [ -n "${SNAP_ON:-}" ] && [[ "$*" == *"$SNAP_ON"* ]] && [ -f "$OUT/results.tar.gz" ]; then
  cp "$OUT/results.tar.gz" "$SNAP"
fi
if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then
  exit "${FAIL_RC:-3}"
fi
case $1 in
  benchmarks/*.py)
    tag=
    previous=
    for arg in "$@"; do
      [ "$previous" = --tag ] && tag=$arg
      previous=$arg
    done
    mkdir -p "$HGRN_BENCH_RESULTS"
    name=${1#benchmarks/}
    echo '{"rows": []}' > "$HGRN_BENCH_RESULTS/${name%.py}${tag}_gpu.json"
    ;;
esac
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

# The session's settings, taken out of the environment the tests inherit.
SETTINGS = re.compile(
    r"^(STEPS|TAG|TTA_\w+|SESSION_LIMIT_S|LOG_DIR|HGRN_BENCH_RESULTS|ALLOW_CPU|OUT|FLA"
    r"|FAIL_\w+|SNAP\w*)$"
)


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run the script with the stand-in interpreter (no check of its exit status)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    (tmp_path / "argv.txt").write_text("")
    environment = {
        **{k: v for k, v in os.environ.items() if not SETTINGS.match(k)},
        "PYTHON": str(fake),
        "CALLS": str(calls),
        "ARGV": str(tmp_path / "argv.txt"),
        "OUT": str(tmp_path / "out"),
        "HGRN_BENCH_RESULTS": str(tmp_path / "results"),
        "TTA_DIR": str(tmp_path / "tta_runs"),
        "TTA_CACHE": str(tmp_path / "cache"),
        "TTA_WORK": str(tmp_path / "work"),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _session(tmp_path: Path, **env: str) -> list[str]:
    """Run the script with the stand-in interpreter; the Python commands it ran, in order."""
    done = _run(tmp_path, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (tmp_path / "calls.txt").read_text().splitlines()


def _last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.strip().splitlines()[-1]


def _tarball(tmp_path: Path, path: Path | None = None) -> list[str]:
    with tarfile.open(path or tmp_path / "out" / "results.tar.gz") as tar:
        return tar.getnames()


def _what(call: str) -> str:
    """A recorded call, short: the script, or the module (and a training run's config)."""
    words = call.split()
    if words[0] != "-m":
        return words[0]
    config = [w for w in words if w.startswith("--config=")]
    return " ".join(["-m", words[1], *config])


@pytest.mark.parametrize(
    "models, runs",
    [("hgrn", ["hgrn"]), ("", []), (None, ["hgrn", "transformer"])],
    ids=["one model", "data only", "default"],
)
def test_time_to_accuracy_steps(tmp_path, models, runs):
    env = {"TTA_ONLY": "1", "TTA_MINUTES": "2"} | ({} if models is None else {"TTA_MODELS": models})
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
            f"--png {tmp_path / 'results' / 'listops_time_to_accuracy_gpu.png'}"
        ]
    else:
        assert plots == [] and not (tmp_path / "tta_runs").exists()


def test_no_time_to_accuracy_runs_nothing(tmp_path):
    assert _session(tmp_path, TTA_ONLY="1", TTA_MINUTES="0") == []


def test_prepare_generates_the_data_and_checks_the_runner(tmp_path):
    calls = _session(tmp_path, TTA_ONLY="1", TTA_MINUTES="0", TTA_PREPARE="1")
    cache, work = tmp_path / "cache", tmp_path / "work"
    # The data step runs in the background, beside the tiny run.
    assert sorted(calls)[1] == f"-m hgrn_jax.data.listops --spec=lra --cache_dir={cache}"
    assert re.fullmatch(
        re.escape(
            "-m experiments.train --config=experiments/configs/lra/listops.py:tiny "
            f"--workdir={work / 'tiny'}-"
        )
        + r"\d{8}-\d{6} "
        + re.escape(f"--config.data.source=generated --config.data.cache_dir={cache}"),
        sorted(calls)[0],
    )


def test_seconds_override_minutes(tmp_path):
    calls = _session(tmp_path, TTA_ONLY="1", TTA_MINUTES="8", TTA_SECONDS="90", TTA_MODELS="hgrn")
    (train,) = [c for c in calls if c.startswith("-m experiments.train")]
    assert "--config.max_train_time_s=90 " in train
    assert re.search(
        rf"--workdir={re.escape(str(tmp_path / 'work' / 'hgrn'))}-\d{{8}}-\d{{6}} ", train
    )


def test_whole_session_order(tmp_path):
    """STEPS=all: every measurement, then both models; at most 8 files come back (the lent
    machine's limit), every step's log packed into the one tarball."""
    calls = _session(tmp_path, STEPS="all", TTA_SECONDS="60", TTA_PREPARE="1", TAG="_h200", FLA="1")
    scripts = [c.split()[0] for c in calls if c.startswith("benchmarks/")]
    assert scripts == [
        "benchmarks/pallas_gpu.py",
        "benchmarks/pallas_gpu.py",
        "benchmarks/matrix_recurrence.py",
        "benchmarks/peers_gpu.py",
        "benchmarks/train_throughput.py",
        "benchmarks/train_throughput.py",
        "benchmarks/device_time.py",
        "benchmarks/train_throughput.py",
    ]
    assert all("--tag _h200" in c for c in calls if c.startswith("benchmarks/"))
    # The data are generated while the GPU steps run; the models train after all of them.
    data = calls.index(f"-m hgrn_jax.data.listops --spec=lra --cache_dir={tmp_path / 'cache'}")
    trains = [i for i, c in enumerate(calls) if "--config.max_train_time_s=60 " in c]
    last_gpu_step = max(i for i, c in enumerate(calls) if c.startswith("benchmarks/"))
    assert len(trains) == 2 and min(trains) > max(data, last_gpu_step)
    out = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert [p.name for p in out] == ["results.tar.gz"]
    logs = {Path(name).name for name in _tarball(tmp_path) if name.endswith(".log")}
    steps = "pallas mosaic matrix peers lm lra device mosaic_lra runner tta_data tta_hgrn"
    assert logs >= {f"{name}.log" for name in steps.split()} | {"session.log"}


def test_steps_pick_the_measurements(tmp_path):
    """STEPS splits the measurements over commands on a warm machine (the kernels first, then
    the training steps), with the kernel options timed beside the defaults in both; the Mosaic
    GPU kernels run in steps of their own, beside the default kernel, with their own files."""
    first = _session(tmp_path, STEPS="pallas mosaic", TAG="_h")
    assert [c.split()[0] for c in first] == ["benchmarks/pallas_gpu.py"] * 2
    assert first[0].endswith("--tag _h") and "mosaic_gpu" not in first[0]
    assert "--variants default mosaic_gpu mosaic_gpu, auto barriers --sweep-base" in first[1]
    assert first[1].endswith("--tag _h_mosaic")
    second = _session(tmp_path, STEPS="lm lra device")
    assert [c.split()[0] for c in second] == [
        "benchmarks/train_throughput.py",
        "benchmarks/train_throughput.py",
        "benchmarks/device_time.py",
    ]
    assert all("chained kernel" in c for c in second)


def _loan_commands() -> list[str]:
    """The commands of benchmarks/README.md's plan for the next loans, as written there."""
    text = (REPO / "benchmarks" / "README.md").read_text()
    plan = text[text.index("**The next loans.**") :]
    plan = plan[: plan.index("\n\n")]
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", plan))
    return [span for span in spans if span.endswith("bash benchmarks/gpu_session.sh")]


# What each of the README's commands runs: the Python commands, sorted (the data step runs in the
# background), and the lent machine's 10 minutes hold each.
LOAN_STEPS = {
    'STEPS="pallas mosaic" TAG=_<kind> bash benchmarks/gpu_session.sh': [
        "benchmarks/pallas_gpu.py",
        "benchmarks/pallas_gpu.py",
    ],
    'STEPS="lm lra device" TAG=_<kind> bash benchmarks/gpu_session.sh': [
        "benchmarks/device_time.py",
        "benchmarks/train_throughput.py",
        "benchmarks/train_throughput.py",
    ],
    "STEPS=mosaic_lra TAG=_<kind> bash benchmarks/gpu_session.sh": [
        "benchmarks/train_throughput.py",
    ],
    "TTA_ONLY=1 TTA_PREPARE=1 TTA_MINUTES=0 bash benchmarks/gpu_session.sh": [
        "-m experiments.train --config=experiments/configs/lra/listops.py:tiny",
        "-m hgrn_jax.data.listops",
    ],
    "TTA_ONLY=1 TTA_MODELS=hgrn bash benchmarks/gpu_session.sh": [
        "-m experiments.report",
        "-m experiments.train --config=experiments/configs/lra/listops.py",
        "-m hgrn_jax.data.listops",
    ],
}


def test_readme_loan_commands_run_exactly_their_steps(tmp_path):
    """The README's kernel and training-step commands once also started the two 8-minute
    time-to-accuracy runs (TTA_MINUTES defaulted to 8 whatever STEPS said): on a lent machine
    the command was killed inside them, before the tarball, and every JSON was lost. Each
    command of the plan, run as written, runs its own steps only, within the command's limit."""
    assert sorted(_loan_commands()) == sorted(LOAN_STEPS)
    for index, command in enumerate(_loan_commands()):
        *assignments, bash, script = shlex.split(command)
        assert (bash, script) == ("bash", "benchmarks/gpu_session.sh")
        env = dict(a.replace("<kind>", "h100").split("=", 1) for a in assignments)
        run_dir = tmp_path / str(index)
        run_dir.mkdir()
        done = _run(run_dir, **env)
        assert done.returncode == 0, command + "\n" + done.stdout[-3000:] + done.stderr
        calls = (run_dir / "calls.txt").read_text().splitlines()
        assert sorted(_what(c) for c in calls) == LOAN_STEPS[command], command
        for call in calls:
            if call.startswith("benchmarks/"):
                assert re.search(r"--tag _h100(_mosaic)?$", call), call
            if "listops.py " in call:  # the 8 minutes, whole
                assert "--config.max_train_time_s=480 " in call
        limits = [int(n) for n in re.findall(r"\(limit (\d+) s\)", done.stdout)]
        assert limits and max(limits) <= 580 - 10, command


def test_the_bare_command_and_unknown_steps_are_refused(tmp_path):
    """The bare command ran every step (about 48 minutes of limits against a lent machine's 10
    per command, 13 files against 8); a misspelt step was silently left out."""
    done = _run(tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert 'STEPS="pallas mosaic" TAG=_<kind>' in line and "TTA_ONLY=1 TTA_MODELS=hgrn" in line
    misspelt = _run(tmp_path, STEPS="pallas mosiac")
    assert misspelt.returncode == 2
    assert "no step 'mosiac'" in misspelt.stderr and "choose from: pallas mosaic" in misspelt.stderr
    both = _run(tmp_path, STEPS="pallas", TTA_ONLY="1")
    assert both.returncode == 2 and 'STEPS="pallas" is set too' in both.stderr
    assert (tmp_path / "calls.txt").read_text() == ""


def test_the_tarball_is_rebuilt_after_every_step(tmp_path):
    """Results came back only in a tarball made at the very end: a command killed in its last
    step brought back nothing. Now what a command killed in the lm step would bring back holds
    the pallas step's JSON and log."""
    snapshot = tmp_path / "while_lm.tar.gz"
    _session(tmp_path, STEPS="pallas lm", TAG="_t", SNAP_ON="train_throughput", SNAP=str(snapshot))
    names = _tarball(tmp_path, snapshot)
    assert any(name.endswith("results/pallas_gpu_t_gpu.json") for name in names)
    assert any(name.endswith("/pallas.log") for name in names)
    assert not any("train_throughput" in name for name in names)
    final = _tarball(tmp_path)
    assert any(name.endswith("results/train_throughput_t_gpu.json") for name in final)
    assert any(name.endswith("/lm.log") for name in final)


@pytest.mark.parametrize("tar_rc", [1, 2])
def test_a_file_changed_while_packing_keeps_the_tarball(tmp_path, tar_rc):
    """GNU tar exits 1 when a file changed while it was read (a log still written by the data
    step in the background): the archive is whole, but the script took it for a failure,
    dropped it and kept the previous one, and still exited 0. Exit 1 now keeps it; a real
    failure (2) keeps the previous tarball and fails the command, naming the packing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_tar = subprocess.run(
        ["bash", "-c", "command -v tar"], capture_output=True, text=True, check=True
    ).stdout.strip()
    fake_tar = bin_dir / "tar"
    fake_tar.write_text(f'#!/usr/bin/env bash\n"{real_tar}" "$@" || exit $?\nexit {tar_rc}\n')
    fake_tar.chmod(0o755)
    done = _run(tmp_path, STEPS="pallas", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    packed = (tmp_path / "out" / "results.tar.gz").exists()
    if tar_rc == 1:
        assert done.returncode == 0 and packed, done.stdout[-2000:]
        assert any(name.endswith("pallas_gpu_gpu.json") for name in _tarball(tmp_path))
    else:
        assert done.returncode == 1 and not packed
        assert "packing (tar exit 2)" in _last_line(done)


def test_step_limits_are_cut_to_what_is_left_of_the_command(tmp_path):
    """A time-to-accuracy step's limit was its budget + 240 s (720 s at 8 minutes) against a
    lent machine's 600 s per command: each limit is now cut to what is left of SESSION_LIMIT_S,
    and the log says so."""
    done = _run(tmp_path, STEPS="pallas", SESSION_LIMIT_S="100")
    assert done.returncode == 0
    cut = re.search(r"pallas: limit cut from 240 s to (\d+) s", done.stdout)
    assert cut and 60 <= int(cut[1]) <= 90  # 100 s less the reserve and time gone
    assert f"pallas (limit {cut[1]} s)" in done.stdout
    # An 8-minute run fits the default limit; with less left its training budget is cut.
    done = _run(tmp_path, TTA_ONLY="1", TTA_MODELS="hgrn")
    (limit,) = re.findall(r"tta_hgrn \(limit (\d+) s\)", done.stdout)
    assert int(limit) <= 570 and "--config.max_train_time_s=480 " in done.stdout
    done = _run(tmp_path, TTA_ONLY="1", TTA_MODELS="hgrn", SESSION_LIMIT_S="300")
    assert done.returncode == 0
    trained = re.search(r"training budget cut from 480 s to (\d+) s", done.stdout)
    assert trained and 170 <= int(trained[1]) <= 230  # 300 s less 10, 60 and time gone
    assert f"--config.max_train_time_s={trained[1]} " in done.stdout
    assert _last_line(done).endswith(f"done; cut: tta_hgrn trained {trained[1]} of 480 s")


def test_steps_without_time_left_are_skipped_and_named(tmp_path):
    done = _run(tmp_path, STEPS="pallas lm", SESSION_LIMIT_S="25")
    assert done.returncode == 1 and (tmp_path / "calls.txt").read_text() == ""
    assert re.search(r"pallas: skipped, \d+ s left of SESSION_LIMIT_S=25", done.stdout)
    assert _last_line(done).endswith(
        "failed: pallas (skipped: no time left); lm (skipped: no time left)"
    )


@pytest.mark.parametrize(
    "rc, why", [("3", "exit 3"), ("124", "timed out at 200 s")], ids=["fails", "times out"]
)
def test_a_failed_step_makes_the_command_fail_naming_it(tmp_path, rc, why):
    """The script exited 0 whatever its steps did. The steps after a failed one still run."""
    done = _run(tmp_path, STEPS="pallas lm device", FAIL_ON="train_throughput", FAIL_RC=rc)
    assert done.returncode == 1
    scripts = [c.split()[0] for c in (tmp_path / "calls.txt").read_text().splitlines()]
    assert scripts[-1] == "benchmarks/device_time.py"
    assert _last_line(done).endswith(f"failed: lm ({why})")
    assert any(name.endswith("results/device_time_gpu.json") for name in _tarball(tmp_path))


def test_matrix_and_peers_write_files_of_their_own_tag(tmp_path):
    """matrix_recurrence.py and peers_gpu.py had no --tag: a lent machine's run overwrote the
    committed matrix_recurrence_gpu.json and peers_gpu.json."""
    from benchmarks import matrix_recurrence, peers_gpu

    calls = _session(tmp_path, STEPS="matrix peers", TAG="_h100", FLA="1")
    assert [c.split()[0] for c in calls] == [
        "benchmarks/matrix_recurrence.py",
        "benchmarks/peers_gpu.py",
    ]
    argv = [c.split()[1:] for c in calls]
    assert matrix_recurrence.build_parser().parse_args(argv[0]).tag == "_h100"
    assert peers_gpu.build_parser().parse_args(argv[1]).tag == "_h100"
    written = sorted(p.name for p in (tmp_path / "results").glob("*.json"))
    assert written == ["matrix_recurrence_h100_gpu.json", "peers_gpu_h100_gpu.json"]


def test_each_time_to_accuracy_run_gets_a_fresh_workdir(tmp_path):
    """TTA_WORK/<model> was reused: a second run of a model on a warm machine resumed the first's
    checkpoint and returned its results.json. Each run gets a new folder; none is deleted."""
    stale = tmp_path / "work" / "hgrn"
    stale.mkdir(parents=True)
    (stale / "results.json").write_text('{"old": true}')
    workdirs = []
    for _ in range(2):
        calls = _session(tmp_path, TTA_ONLY="1", TTA_MODELS="hgrn", TTA_SECONDS="60")
        (train,) = [c for c in calls if c.startswith("-m experiments.train")]
        workdirs.append(re.search(r"--workdir=(\S+)", train)[1])
    assert len(set(workdirs)) == 2 and str(stale) not in workdirs
    assert all(Path(w).parent == tmp_path / "work" for w in workdirs)
    assert all((Path(w) / "results.json").is_file() for w in workdirs)
    assert json.loads((stale / "results.json").read_text()) == {"old": True}


def test_wheels_folder_is_ignored_by_git():
    """The READMEs say .whl/ (wheels carried to a lent machine) is ignored by git."""
    done = subprocess.run(["git", "check-ignore", "-q", ".whl/jax-0.0-py3-none-any.whl"], cwd=REPO)
    assert done.returncode == 0


def test_benchmark_commands_parse_with_their_scripts_command_lines(tmp_path):
    """Every benchmark command of a whole session, arguments as bash passes them, parses with
    its script's own command line: a misspelt flag or variant would otherwise stop that step
    on a lent machine, minutes into its device time."""
    from benchmarks import device_time, matrix_recurrence, pallas_gpu, peers_gpu, train_throughput

    _session(tmp_path, STEPS="all", TTA_MINUTES="0", TAG="_h200", FLA="1")
    text = (tmp_path / "argv.txt").read_text()
    commands = [call.strip("\n").split("\n") for call in text.split("<end of call>\n") if call]
    parsers = {
        f"benchmarks/{module.__name__.split('.')[-1]}.py": module.build_parser
        for module in (device_time, matrix_recurrence, pallas_gpu, peers_gpu, train_throughput)
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
        "benchmarks/peers_gpu.py",
        "benchmarks/train_throughput.py",
        "benchmarks/train_throughput.py",
        "benchmarks/device_time.py",
        "benchmarks/train_throughput.py",
    ]
    assert all(args.tag.startswith("_h200") for _, args in parsed)
    assert parsed[0][1].variants == pallas_gpu.DEFAULT_VARIANTS
    mosaic = parsed[1][1]
    assert mosaic.variants == ["default", "mosaic_gpu", "mosaic_gpu, auto barriers"]
    assert mosaic.sweep_base == "mosaic_gpu"
    assert pallas_gpu.sweep_options(mosaic.sweep_base)[0] == {"block_rows": 32}
    lra = parsed[5][1]
    assert lra.task == "lra" and "directions in two scans" in lra.variants
    mosaic_lra = parsed[7][1]
    assert mosaic_lra.task == "lra" and mosaic_lra.variants == ["after", "mosaic_gpu kernel"]


@pytest.mark.parametrize(
    "script, argv, flag",
    [
        ("pallas_gpu", ["--dtypes", "float32", "bf16"], "--dtypes"),
        ("pallas_gpu", ["--sweep-dtypes", "float23"], "--sweep-dtypes"),
        ("matrix_recurrence", ["--dtype", "bf16"], "--dtype"),
        ("train_throughput", ["--methods", "auto", "palas"], "--methods"),
        ("device_time", ["--methods", "chunk"], "--methods"),
    ],
)
def test_a_misspelt_value_is_refused_before_anything_runs(script, argv, flag, capsys):
    """These flags took any value and failed minutes into a run (a traceback in the kernel's
    checks, a ValueError once the models were built)."""
    import importlib

    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as exit_info:
        module.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in error and "invalid choice" in error


def test_pallas_gpu_records_a_failing_variant_and_goes_on(tmp_path, monkeypatch):
    """One variant that failed to compile (its check) or to run (out of memory at one length)
    ended pallas_gpu.py before it wrote any JSON. Now each failure is recorded, with its
    message, the other variants are timed, and the script exits with an error at the end."""
    from benchmarks import pallas_gpu

    def check(dtype_name, reverse, chunk_length, variant="default"):
        if variant == "chain in kernel" and dtype_name == "float32":
            raise RuntimeError("Triton compilation failed\n" + "details " * 1000)
        return {"variant": variant, "dtype": dtype_name, "reverse": reverse, "ok": True}

    def time_pallas(length, dtype_name, passes, reps, bandwidth, variant="default", **options):
        if variant == "loads after stores" and length == 8:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        row = {"variant": variant, "dtype": dtype_name, "length": length, "ms": 1.0}
        return [row | {"pass": name} for name in passes]

    monkeypatch.setenv("HGRN_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(pallas_gpu, "check", check)
    monkeypatch.setattr(pallas_gpu, "time_pallas", time_pallas)
    monkeypatch.setattr(pallas_gpu, "copy_bandwidth", lambda *args, **kwargs: 1e12)
    argv = ["pallas_gpu.py", "--allow-interpret", "--lengths", "8", "16", "--dtypes", "float32"]
    argv += ["--trace-lengths", "--sweep-lengths", "--tag", "_t"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(
        SystemExit,
        match="4 correctness checks failed.*, 1 timings or traces raised, 2 rows not timed",
    ):
        pallas_gpu.main()
    written = json.loads(next(tmp_path.glob("pallas_sweep_t_*.json")).read_text())
    failed = [c for c in written["meta"]["checks"] if not c["ok"]]
    assert len(failed) == 4 and {c["variant"] for c in failed} == {"chain in kernel"}
    assert all(c["error"] == "RuntimeError: Triton compilation failed" for c in failed)
    rows = [(r["variant"], r["length"], r.get("pass"), r.get("error")) for r in written["rows"]]
    assert rows == [
        ("default", 8, "forward", None),
        ("default", 8, "forward+backward", None),
        ("loads after stores", 8, None, "RuntimeError: RESOURCE_EXHAUSTED: out of memory"),
        (
            "chain in kernel",
            8,
            None,
            "not timed: its check raised RuntimeError: Triton compilation failed",
        ),
        ("default", 16, "forward", None),
        ("default", 16, "forward+backward", None),
        ("loads after stores", 16, "forward", None),
        ("loads after stores", 16, "forward+backward", None),
        (
            "chain in kernel",
            16,
            None,
            "not timed: its check raised RuntimeError: Triton compilation failed",
        ),
    ]


def test_device_time_writes_each_row_and_goes_on_after_a_failed_compile(tmp_path, monkeypatch):
    """device_time.py wrote its JSON only after a whole length, and a row whose step did not
    compile ended it: a command killed midway, or one failing variant, lost every row."""
    from benchmarks import device_time

    real_undone = device_time.undone

    def undone(changes):
        if "phases per direction" in changes:
            raise RuntimeError("this GPU refuses the kernel\nat great length")
        return real_undone(changes)

    traced = []

    def traced_events(fn, steps):
        traced.append(steps)
        if len(traced) == 2:  # the Transformer's row: the command is killed here
            raise KeyboardInterrupt
        return []

    monkeypatch.setenv("HGRN_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(device_time, "undone", undone)
    monkeypatch.setattr(device_time, "traced_events", traced_events)
    argv = ["device_time.py", "--task", "lra", "--batch", "2", "--lengths", "16", "--steps", "1"]
    argv += ["--methods", "associative", "--variants", "after", "phases per direction"]
    monkeypatch.setattr(sys, "argv", argv + ["--tag", "_t"])
    with pytest.raises(KeyboardInterrupt):
        device_time.main()
    written = json.loads(next(tmp_path.glob("device_time_t_*.json")).read_text())
    assert [(r["model"], r["length"]) for r in written["rows"]] == [("hgrn[associative]", 16)]
    assert written["meta"]["failed"] == [
        "hgrn[associative] (phases per direction) L=16: RuntimeError: this GPU refuses the kernel"
    ]
