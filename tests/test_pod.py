"""A simulated pod on one machine, through ``python -m experiments.launch`` (docs/pods.md).

Four processes x two CPU devices with the mesh (data=2, fsdp=2, model=2) spanning them, against
one process with eight devices (this pytest process, which conftest gives eight devices):

- the tiny ListOps run of docs/pods.md, and the tiny Retrieval, ImageNet and WikiText-103 runs
  (on 2 processes x 4 devices), give the training losses and final metrics of one process, and
  the ListOps and WikiText-103 runs its parameters and Adam moments too;
- the pod's logs (process 0 only, plain lines, a start-up summary) and files (one writer);
- a host failure (SIGKILL to one of 4 processes between checkpoints): the others stop by
  themselves naming it; the rerun, on 2 processes x 4 devices, resumes from the last complete
  checkpoint and gets a preemption notice (SIGTERM to one process): both save the same step and
  exit 0; the next rerun finishes with the parameters of the uninterrupted run;
- elastic restore 4x2 -> 1x8 and 1x8 -> 2x4;
- sequence parallelism over a mesh axis that spans two processes.

CPU cost is the constraint (2 cores): one uninterrupted pod run and one single-process run are
shared by every ListOps check; the schedule is 12 steps with evaluations and checkpoints at 6
and 12 (so the best validation step is chosen alike; this also covers what the two-process
ListOps test, tests/test_train_multihost.py, checked before the pods ran in `make test`), and
the failure and elastic runs start from a copy of the uninterrupted run at its checkpoint 6.

Tolerances: the pod and one process run the same program, but cross-device float32 sums are
reduced in another order (gloo across processes, in-process otherwise), so training losses agree
to float32 rounding (rel 1e-5) and parameters and Adam moments to 1e-5 relative to each array's
largest entry after 12 steps (measured ~6e-7; 4x2 and 2x4, both through gloo, agree bitwise), except the directions the loss cannot see
(pod_helpers.GAUGE: biases just before a BatchNorm have zero true gradient, so Adam turns
rounding noise of either sign into steps of up to lr each; bounded by lr x steps; the BatchNorm
running means follow them). Accuracy counts agree exactly; evaluation losses to 1e-3 (the running
means). A restore itself is exact: the restored state is the saved one, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pod_helpers import (
    REPO,
    Launch,
    checkpoint_arrays,
    docs_local_command,
    flat_arrays,
    gauge_abs_diff,
    load_config,
    max_rel_diff,
    param_diffs,
    process_lines,
    run_launch,
    train_records,
    truncate_run,
    with_flag,
)

# Four JAX processes per run on two cores. The module's runs are shared by its tests, so one
# xdist worker must run them all: `make test` hands whole files to its workers (--dist loadfile),
# and conftest puts this module first.
pytestmark = [pytest.mark.slow, pytest.mark.pod]

# The docs' command with a 12-step schedule and small splits; 1 layer to keep compiles short.
SHORT = [
    "--config.model.num_layers=1",
    "--config.num_train_steps=12",
    "--config.eval_every=6",
    "--config.checkpoint_every=6",
    "--config.log_every=3",
    "--config.data.val_examples=40",
    "--config.data.test_examples=40",
    "--config.data.train_examples=400",
]
PARAM_RTOL = 1e-5
GAUGE_ATOL = 3e-3 * 12  # the tiny ListOps learning rate x steps: Adam moves at most lr a step
LOSS_RTOL = 1e-5
MEASURED: dict[str, object] = {}  # numbers for the report, printed at the end (pytest -s)


def _listops_args(workdir: Path, cache: Path) -> list[str]:
    launcher_flags, train_args = docs_local_command()
    assert launcher_flags == ["--num_processes=4", "--devices_per_process=2"], launcher_flags
    args = with_flag(train_args, "workdir", str(workdir))
    return args + [f"--config.data.cache_dir={cache}"] + SHORT


def _config_of(args: list[str]):
    spec = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
    return load_config(spec, [a for a in args if a.startswith("--config.")])


def _train_here(args: list[str], workdir: Path) -> dict:
    """``experiments.train args`` in this process (1 process x 8 devices)."""
    from hgrn_jax.training.loop import train_and_evaluate

    return train_and_evaluate(_config_of(args), workdir)


@pytest.fixture(scope="module")
def pod_root(tmp_path_factory) -> Path:
    """The module's folder; at the end, what the tests measured is printed (``pytest -s``) and
    written to ``$HGRN_POD_MEASUREMENTS`` when set."""
    yield tmp_path_factory.mktemp("pod")
    print("\n" + json.dumps(MEASURED, indent=1, default=str), file=sys.stderr)
    if os.environ.get("HGRN_POD_MEASUREMENTS"):
        Path(os.environ["HGRN_POD_MEASUREMENTS"]).write_text(
            json.dumps(MEASURED, indent=1, default=str)
        )


@pytest.fixture(scope="module")
def listops(pod_root):
    """The uninterrupted runs every ListOps check shares: 4x2 through the launcher, and 1x8."""
    cache = pod_root / "cache"
    pod_dir, single_dir = pod_root / "listops-4x2", pod_root / "listops-1x8"
    started = time.monotonic()
    launch = run_launch(pod_root, 4, 2, _listops_args(pod_dir, cache), name="listops-4x2")
    MEASURED["listops 4x2 run (s)"] = round(time.monotonic() - started, 1)
    _train_here(_listops_args(single_dir, cache), single_dir)
    return {"pod": pod_dir, "single": single_dir, "cache": cache, "launch": launch}


def _assert_same_results(pod: Path, single: Path, name: str, processes: int = 4) -> None:
    one = json.loads((single / "results.json").read_text())
    pod_results = json.loads((pod / "results.json").read_text())
    assert (pod_results["process_count"], one["process_count"]) == (processes, 1)
    assert pod_results["devices"] == one["devices"] == 8
    assert pod_results["num_params"] == one["num_params"]
    assert pod_results["steps"] == one["steps"] and pod_results["best_step"] == one["best_step"]
    losses_pod, losses_one = train_records(pod), train_records(single)
    assert [r["step"] for r in losses_pod] == [r["step"] for r in losses_one]
    worst = max(
        abs(a["loss"] - b["loss"]) / abs(b["loss"])
        for a, b in zip(losses_pod, losses_one, strict=True)
    )
    assert worst <= LOSS_RTOL, (name, worst)
    metric = one["metric"]
    if metric == "accuracy":
        assert pod_results["best_val"] == one["best_val"] and pod_results["test"] == one["test"]
    else:  # perplexity: exp of a float32 mean loss
        assert pod_results["test"] == pytest.approx(one["test"], rel=1e-4)
    assert pod_results["test_loss"] == pytest.approx(one["test_loss"], rel=1e-3)
    layout = f"{processes}x{8 // processes}"
    MEASURED[f"{name} {layout} vs 1x8: train loss max rel diff"] = worst
    MEASURED[f"{name} {layout} vs 1x8: test {metric}"] = (pod_results["test"], one["test"])


def _assert_same_params(
    workdir: Path, reference: Path, step: int, name: str, bitwise: bool = False
) -> None:
    got, want = checkpoint_arrays(workdir, step), checkpoint_arrays(reference, step)
    diff, gauge = max_rel_diff(got, want), gauge_abs_diff(got, want)
    MEASURED[f"{name}: params+moments max rel diff"] = diff
    MEASURED[f"{name}: biases before BatchNorm max abs diff"] = gauge
    if bitwise:
        np.testing.assert_equal(got, want)
    assert diff <= PARAM_RTOL, (name, diff)
    assert gauge <= GAUGE_ATOL, (name, gauge)


def test_listops_pod_equals_one_process(listops):
    _assert_same_results(listops["pod"], listops["single"], "listops")
    step = 12
    _assert_same_params(listops["pod"], listops["single"], step, "listops 4x2 vs 1x8")


def test_pod_logs_and_files_come_from_process_0(listops):
    stderr = listops["launch"].stderr
    zero = process_lines(stderr, 0)
    assert "task listops: data source 'generated' (train 400, val 40, test 40 examples)" in zero
    assert any(
        re.fullmatch(r"model: [\d,]+ parameters; mesh data=2 x fsdp=2 x model=2", line)
        for line in zero
    ), zero
    assert "4 processes x 2 cpu devices = 8 devices" in zero
    assert any(line.startswith("starting at step 0 of 12 in ") for line in zero)
    plain = [
        line
        for line in zero
        if re.fullmatch(
            r"step \d+/12  loss \d+\.\d{4}  \d+\.\d\d steps/s  (\d+s|\d+m\d\ds) left", line
        )
    ]
    assert [int(line.split()[1].split("/")[0]) for line in plain] == [3, 6, 9, 12], zero
    assert any(line.startswith("step 12: val loss ") for line in zero)
    assert any(
        line.startswith("listops: best val accuracy")
        for line in process_lines(listops["launch"].stdout, 0)
    )
    for index in (1, 2, 3):  # other processes: nothing but warnings (and gloo's own lines)
        spoken = [
            line
            for line in process_lines(stderr, index)
            + process_lines(listops["launch"].stdout, index)
            if not line.startswith(("[Gloo]", "W", "E", "I"))
            and "Gloo" not in line
            and line.strip()
        ]
        assert not [line for line in spoken if re.search(r"step|listops|task|val ", line)], spoken
    # Only process 0 wrote: one record per logged step, not four.
    assert [r["step"] for r in train_records(listops["pod"])] == [3, 6, 9, 12]
    assert [r["step"] for r in train_records(listops["pod"], "test")] == [12]


def test_host_failure_then_preemption_then_resume_on_another_layout(listops, pod_root):
    cache, workdir = listops["cache"], pod_root / "listops-failures"
    args = _listops_args(workdir, cache)

    # 1. The uninterrupted run as it was at its checkpoint 6 resumes; SIGKILL process 2 once
    # process 0 has logged step 9, between checkpoints 6 and 12.
    truncate_run(listops["pod"], workdir, 6)
    launch = Launch(pod_root, 4, 2, args, name="kill")
    pids = launch.pids()
    launch.wait_for(r"^\[0\] step 9/12 ", 600)
    os.kill(pids[2], signal.SIGKILL)
    killed_at = time.monotonic()
    code = launch.wait(timeout=300)
    detect_s = time.monotonic() - killed_at
    MEASURED["time from SIGKILL to every process stopped (s)"] = round(detect_s, 1)
    stderr = launch.stderr
    # Each survivor stops by itself, with no traceback: the peer monitor's one line and exit 3,
    # whichever comes first, its poll or a collective failing in the main thread (gloo's
    # "Connection reset by peer", at once). (Before, a survivor printed the collective's
    # traceback, then JAX aborted it at the shutdown barrier in Python's exit handlers.) One
    # race is left: JAX's client aborts a process itself once the coordination service
    # declares the peer dead ("Task 2 heartbeat timeout", SIGABRT), the moment the monitor
    # learns it too; a survivor that loses that race ends so. So does one whose answer had
    # not arrived when process 0, which hosts the service, exited (process 0 waits
    # watchdog.COORDINATOR_LINGER_S for them first, test_launch.py; seen only under heavy
    # load). The launcher ends as the survivors do: 3 when one stopped on the lost peer.
    assert "still running; stopping them" not in stderr  # they stopped by themselves
    said_lost = []
    for index in (0, 1, 3):
        said = process_lines(stderr, index)
        text = "\n".join(said)
        assert "Traceback" not in text, text[-3000:]
        if f"[launch] process {index} stopped (exit code 3)" in stderr:
            said_lost.append(index)
            errors = [line for line in said if line.startswith("error: ")]
            assert len(errors) == 1 and re.fullmatch(
                rf"error: process {index}: lost process 2 \(no heartbeat: killed, crashed or "
                r"preempted\); stopping\. The last complete checkpoint is kept: run the same "
                r"command again to resume from it\.",
                errors[0],
            ), text[-3000:]
            for crash in ("Fatal Python error", "Check failure", "Aborted"):
                assert crash not in text, text[-3000:]
        else:  # JAX's own abort won the race
            assert f"[launch] process {index} stopped (killed by SIGABRT)" in stderr, text[-3000:]
            assert re.search(
                r"Task 2 heartbeat timeout|stopped sending heartbeats"
                + ("" if index == 0 else r"|Failed to send RPC to coordination service"),
                text,
            ), text
    if said_lost:
        assert code == 3, stderr[-4000:]
        assert (
            f"[launch] FAILED: process 2 (killed by SIGKILL); processes "
            f"{', '.join(map(str, said_lost))} stopped on the lost peer (exit code 3)" in stderr
        ), stderr[-4000:]
    else:
        assert code == 128 + 9 and "[launch] FAILED: process 2 (killed by SIGKILL)" in stderr
    MEASURED["survivors that stopped with the lost-peer line (of 3)"] = len(said_lost)

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6, steps  # nothing after step 6 was saved

    # 2. Rerun on another layout, 2 processes x 4 devices: it resumes from the last complete
    # checkpoint, 6, which 4 processes wrote. SIGTERM to process 1 while it builds the model:
    # both save step 10, exit 0.
    launch = Launch(pod_root, 2, 4, args, name="sigterm-2x4")
    pids = launch.pids()
    launch.wait_for(r"^\[0\] resuming from step 6 of 12", 300)
    os.kill(pids[1], signal.SIGTERM)
    assert launch.wait(timeout=300) == 0, launch.stderr[-4000:]
    zero = process_lines(launch.stderr, 0)
    assert any("preempted (SIGTERM): saved a checkpoint at step 10" in line for line in zero)
    assert "[launch] FAILED" not in launch.stderr
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 10, steps
    assert (
        json.loads((workdir / "checkpoints" / "10" / "meta" / "metadata").read_text())["step"] == 10
    )
    assert not (workdir / "results.json").exists()

    # 3. Resume again (2 x 4): the uninterrupted run's parameters and metrics.
    run_launch(pod_root, 2, 4, args, name="resume-2x4")
    # Bitwise: with several processes every cross-device sum goes through gloo, which adds in
    # the same order for 4 x 2 and 2 x 4 (8 ranks either way); only 1 x 8 sums in-process.
    _assert_same_params(
        workdir,
        listops["pod"],
        12,
        "4x2 killed -> 2x4 preempted -> 2x4 vs uninterrupted 4x2",
        bitwise=True,
    )
    done = json.loads((workdir / "results.json").read_text())
    reference = json.loads((listops["pod"] / "results.json").read_text())
    assert done["process_count"] == 2
    assert done["test"] == reference["test"] and done["best_val"] == reference["best_val"]


def test_elastic_restore_between_a_pod_and_one_process(listops, pod_root):
    # 4x2 checkpoint -> this process (1 x 8).
    resumed = truncate_run(listops["pod"], pod_root / "elastic-4x2-to-1x8", 6)
    args = _listops_args(resumed, listops["cache"])
    # The state restored onto this process's 8-device mesh is the saved one, bit for bit.
    from hgrn_jax.training.loop import Run
    from hgrn_jax.training.state import to_checkpoint_tree

    with Run(_config_of(args), resumed) as run:
        state, meta = run.restore()
    assert meta["step"] == 6
    restored = flat_arrays(to_checkpoint_tree(state))
    np.testing.assert_equal(restored, checkpoint_arrays(listops["pod"], 6))
    # Then the last 6 steps on 1 x 8 sum in another order than 4 x 2.
    _train_here(args, resumed)
    _assert_same_params(resumed, listops["pod"], 12, "restore 4x2 -> 1x8 vs uninterrupted 4x2")

    # 1x8 checkpoint -> 2 x 4 through the launcher (4 x 2 -> 2 x 4 is the failure test's
    # preempted rerun; 2 processes cost half the CPU of 4).
    resumed = truncate_run(listops["single"], pod_root / "elastic-1x8-to-2x4", 6)
    run_launch(pod_root, 2, 4, _listops_args(resumed, listops["cache"]), name="elastic")
    _assert_same_params(resumed, listops["single"], 12, "restore 1x8 -> 2x4 vs uninterrupted 1x8")
    assert (
        json.loads((resumed / "results.json").read_text())["test"]
        == json.loads((listops["single"] / "results.json").read_text())["test"]
    )


# The other tiny presets: 4 steps, one evaluation, small splits, on 2 processes x 4 devices (the
# same mesh, still split across processes: their input pipelines and models on a pod at half the
# CPU of 4 x 2, whose launcher, logs and failures the ListOps runs above cover).
OTHER_PRESETS = {
    "retrieval": (
        "experiments/configs/lra/retrieval.py:tiny",
        [
            "--config.model.num_layers=1",
            "--config.data.val_examples=32",
            "--config.data.test_examples=32",
            "--config.data.train_examples=256",
        ],
    ),
    "imagenet": (
        "experiments/configs/imagenet/tiny.py:tiny",
        [
            "--config.model.num_layers=1",
            "--config.data.val_examples=32",
            "--config.data.test_examples=32",
            "--config.data.train_examples=256",
        ],
    ),
    "wikitext103": (
        "experiments/configs/lm/wikitext103.py:tiny",
        [
            "--config.model.num_layers=1",
            "--config.data.train_bytes=20000",
            "--config.data.eval_bytes=2048",
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(OTHER_PRESETS))
def test_tiny_preset_on_pod_equals_one_process(name, pod_root):
    spec, overrides = OTHER_PRESETS[name]
    pod_dir, single_dir = pod_root / f"{name}-4x2", pod_root / f"{name}-1x8"
    args = [
        f"--config={spec}",
        "--config.num_train_steps=4",
        "--config.eval_every=4",
        "--config.checkpoint_every=4",
        "--config.log_every=2",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.model=2",
        *overrides,
    ]
    if name == "wikitext103":
        # An earlier job's process 0 died with its host: its lock names another host and
        # stopped being refreshed. Process 0 watches it for 4 of its heartbeat periods while
        # process 1 waits for it in its first collective (gloo gives up after 30 s), then takes
        # it over. (2 s periods: the default 5 s leaves 10 s for start-up jitter, and a loaded
        # CI machine needs more; test_faults.py checks that the default stays under 30 s.)
        pod_dir.mkdir()
        holder = {"host": "node-that-died", "pid": 7, "token": "x", "heartbeat_s": 2.0}
        (pod_dir / "run.lock").write_text(json.dumps(holder))
    launch = run_launch(pod_root, 2, 4, [f"--workdir={pod_dir}", *args], name=name)
    if name == "wikitext103":
        assert "[0] warning: StaleLockWarning: " in launch.stderr, launch.stderr[-6000:]
        assert "on host node-that-died, which did not refresh it in 8 s" in launch.stderr
    # XLA's partitioner says so when it cannot move an array between two shardings but by
    # gathering it whole (the Retrieval model's pooled pairs did, 5 times, before the pairs were
    # interleaved; the token embeddings' activations before they gathered their table).
    assert "Involuntary full rematerialization" not in launch.stderr, launch.stderr[-6000:]
    _train_here(args, single_dir)
    _assert_same_results(pod_dir, single_dir, name, processes=2)
    if name == "wikitext103":
        # No BatchNorm, so no gauge directions: every parameter, Adam moment and counter of the
        # last checkpoint agrees to float32 rounding of the sums gloo adds in another order.
        got, want = checkpoint_arrays(pod_dir, 4), checkpoint_arrays(single_dir, 4)
        assert len(got) > 20, sorted(got)  # parameters, both moments, the step counters
        worst = max(param_diffs(got, want).values())
        MEASURED["wikitext103 2x4 vs 1x8: params+moments max rel diff"] = worst
        assert worst <= PARAM_RTOL, worst


def test_sequence_parallelism_across_two_processes(pod_root):
    out = pod_root / "sequence.json"
    run_launch(
        pod_root,
        2,
        2,
        ["python", "tests/pod_sequence_worker.py", "--out", str(out)],
        name="sequence",
    )
    result = json.loads(out.read_text())
    # float64 / complex128: the sharded carries reassociate products of decays, ~1e-16.
    for name, error in result["errors"].items():
        assert error < 1e-12, (name, error)
    MEASURED["sequence parallel across 2 processes: max rel error (f64)"] = max(
        result["errors"].values()
    )
    # HGRN2's matrix recurrence, float64: the carried states are reassociated products of
    # decays and sums of outer products, ~1e-16 too; the scale's gradient is one sum over every
    # output that cancels (sum |terms| / |sum| ~ 94 here), so ~1e-14 (measured 8.9e-15).
    matrix = result["matrix_errors"]
    assert set(matrix) == {"o", "last_state"} | {
        f"grad_{name}" for name in ("q", "k", "v", "log_decay", "h0", "scale")
    }, sorted(matrix)
    for name, error in matrix.items():
        assert error < 1e-12, (name, error)
    MEASURED["sequence parallel HGRN2 across 2 processes: max rel error (f64)"] = max(
        matrix.values()
    )
    assert sorted(result["lm"]) == ["fla_hgrn", "hgrn", "hgrn2"], sorted(result["lm"])
    for name, losses in result["lm"].items():
        assert losses["splits_sequence"], name  # its recurrence runs in a shard_map over "seq"
        sharded, reference = losses["sharded"], losses["reference"]
        assert len(sharded) == len(reference) == 4, (name, losses)
        # float32 LM, other sum order
        np.testing.assert_allclose(sharded, reference, rtol=1e-5, err_msg=name)
        assert sharded[-1] < sharded[0] - 0.5, (name, sharded)  # and it trains
        MEASURED[f"sequence parallel {name} LM across 2 processes: loss max rel diff"] = max(
            abs(a - b) / abs(b) for a, b in zip(sharded, reference, strict=True)
        )


def test_unequal_evaluation_batches_stop_the_pod_instead_of_hanging_it(pod_root):
    """A Task whose processes yield different numbers of evaluation batches breaks the
    protocol (docs/tasks.md); the process with the extra batch waits in its collective forever.
    The others used to wait for it forever too (the step watchdog was paused from the
    evaluation on until the next step); they now time what follows an evaluation, stop after
    HGRN_STEP_TIMEOUT_S naming the likely cause, and the stuck one then loses its peer."""
    args = [
        f"--config={REPO / 'tests' / 'toy_task.py'}",
        f"--workdir={pod_root / 'unequal-eval'}",
        "--config.data.extra_val_batch_on=1",
    ]
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        "HGRN_STEP_TIMEOUT_S": "5",
    }
    launch = run_launch(
        pod_root, 2, 1, args, name="unequal-eval", expect=None, env=env, timeout=240
    )
    assert launch.proc.returncode == 3, launch.stderr[-4000:]
    assert (
        "[0] error: process 0: no progress in 5 s after the evaluation at step 6; a peer process "
        "is stuck or lost, or still evaluating (every process must yield the same number of "
        "evaluation batches, see docs/tasks.md); stopping." in launch.stderr
    ), launch.stderr[-4000:]
    assert "[launch] FAILED: process 0 (exit code 3)" in launch.stderr
