"""Faults a user's run must survive (issue 10): each test reproduces one fault that lost work or
gave a silent wrong answer, and checks the safe behaviour.

Checkpoints: restore never deletes; damaged ones (flipped bytes, truncated or missing files) are
moved aside and the next older one is used; unreadable ones and a changed model stop the run
touching nothing. Workdirs: one run at a time (a lock), config changes checked on resume.
Inputs: every split opened before the first step, token ids checked, readable errors. The
permission cases run their file access as the unprivileged user ``nobody`` (a forked child that
drops root) or, when the suite is not root, as the current user; the classification of
permission and I/O errors is also tested with injected errors.

New names are imported inside the tests, so that on code without them each test fails on its
own rather than the whole module failing to import.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from two_processes import cli_env

from hgrn_jax.training.loop import train_and_evaluate

sys.path.insert(0, str(Path(__file__).parent))
from toy_task import ToyTask, toy_config

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "tests" / "toy_task.py"
LISTOPS_CONFIG = REPO / "experiments" / "configs" / "lra" / "listops.py"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _config(**changes):
    config = toy_config()
    config.keep_checkpoints = 3  # steps 6, 9 and 12 stay: there is an older one to fall back to
    for key, value in changes.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


def _run(config, workdir: Path) -> dict:
    return train_and_evaluate(config, workdir, task=ToyTask(config))


def _tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> digest)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _params(folder: Path) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(folder / "state")
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def _largest_array_file(step_folder: Path) -> Path:
    files = [
        p
        for p in (step_folder / "state").rglob("*")
        if p.is_file() and p.name not in ("_METADATA", "_sharding", "commit_success.txt")
    ]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(path: Path, count: int = 400) -> None:
    data = bytearray(path.read_bytes())
    positions = np.random.default_rng(0).choice(
        len(data), size=min(count, len(data)), replace=False
    )
    for i in positions:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """A complete toy run keeping checkpoints 6, 9 and 12."""
    workdir = tmp_path_factory.mktemp("finished")
    return workdir, _run(_config(), workdir)


@pytest.fixture
def copy_of_finished(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    return run


def _train(
    config_file: Path | str, workdir: Path | str, *overrides: str
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={config_file}",
        f"--workdir={workdir}",
        *overrides,
    ]
    return subprocess.run(
        command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _assert_one_line_usage_error(proc: subprocess.CompletedProcess, *patterns: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _as_unprivileged(action) -> str:
    """Run ``action()`` (pure Python file access, no JAX) as a user that permissions bind:
    ``nobody`` in a forked child when this process is root, else this process. Returns
    ``"ok"`` or ``"<ExceptionClass>: <message>"``."""

    def outcome() -> str:
        try:
            action()
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return "ok"

    if os.geteuid() != 0:
        return outcome()
    # The child cannot import what the parent has not (the interpreter may live under root's
    # 0700 home): secrets.token_hex's decode("ascii") failed with "unknown encoding" when this
    # test ran alone.
    codecs.lookup("ascii")
    read, write = os.pipe()
    with warnings.catch_warnings():  # the child runs no JAX code: fork's caveat does not apply
        warnings.simplefilter("ignore", RuntimeWarning)
        pid = os.fork()
    if pid == 0:  # the child: drop root, act, report, leave without cleanup handlers
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            text = outcome()
        except BaseException as error:
            text = f"child failed: {error!r}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.fixture
def shared_tmp():
    """A temporary folder the unprivileged user can enter (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="hgrn-faults-"))
    os.chmod(folder, 0o755)
    yield folder
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    shutil.rmtree(folder)


# ----------------------------------------------------------------------------------------------
# Checkpoints: never deleted; damaged ones moved aside; flipped bytes detected
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_changed_structure_refuses_and_leaves_the_run_byte_identical(copy_of_finished):
    from hgrn_jax.training.workdir import ConfigChangedError

    run = copy_of_finished
    before = _tree_digest(run)
    with pytest.raises(ConfigChangedError) as caught:
        _run(_config(**{"model.features": 64}), run)
    message = str(caught.value)
    assert "model.features: 16 -> 64" in message
    assert "--workdir" in message and "--config.resume=restart" in message
    assert "\n" not in message
    assert _tree_digest(run) == before  # checkpoints, results.json, metrics: untouched
    assert not (run / "run.lock").exists()


def test_resume_force_with_arrays_that_no_longer_fit_touches_nothing(copy_of_finished):
    from hgrn_jax.training.checkpoint import CheckpointMismatchError

    run = copy_of_finished
    before = _tree_digest(run)
    with pytest.raises(CheckpointMismatchError, match=r"embedding.*\(16, 16\).*\(16, 32\)"):
        _run(_config(**{"model.features": 32, "resume": "force"}), run)
    assert _tree_digest(run) == before  # config.json included: the rerun is not refused
    assert not (run / "checkpoints.damaged").exists()
    assert _run(_config(), run)["steps"] == 12


@pytest.mark.slow
def test_harmless_changes_are_allowed_and_listed(copy_of_finished, finished):
    run = copy_of_finished
    with pytest.warns(UserWarning, match=r"num_train_steps: 12 -> 15"):
        results = _run(_config(num_train_steps=15, log_every=3), run)
    assert results["steps"] == 15 and _steps(run)[-1] == 15
    kept = sorted(set(_steps(run)) & {6, 9, 12})  # the old checkpoints Orbax keeps: unchanged
    assert kept
    for step in kept:
        np.testing.assert_array_equal(
            np.concatenate([x.ravel() for x in _params(run / "checkpoints" / str(step))]),
            np.concatenate([x.ravel() for x in _params(finished[0] / "checkpoints" / str(step))]),
        )


def _saved_run_without(workdir: Path, config, *keys: str) -> Path:
    """A workdir whose ``config.json`` is ``config`` without ``keys`` (dotted), as a run saved
    by code from before those fields existed would hold, with a (placeholder) checkpoint."""
    saved = json.loads(json.dumps(config.to_dict()))
    for key in keys:
        *path, last = key.split(".")
        target = saved
        for part in path:
            target = target[part]
        del target[last]
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(saved))
    return workdir / "config.json"


def test_a_model_key_added_later_at_its_default_resumes(tmp_path):
    """A run saved before a model field existed was built with the field's default: the new
    config at that default resumes it (a harmless change, listed), any other value does not."""
    from experiments.configs.lra import listops
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangedError, ConfigChangeWarning

    config = listops.get_config("tiny")
    assert config.model.use_lower_bound is True  # the field's default
    saved = _saved_run_without(
        tmp_path / "old", config, "model.use_lower_bound", "model.mixer.kind"
    )
    with pytest.warns(ConfigChangeWarning) as caught:
        prepare_workdir(tmp_path / "old", config).release()
    listed = " ".join(str(w.message) for w in caught)
    assert "model.use_lower_bound: absent (default True) -> True" in listed
    assert "model.mixer.kind: absent (default 'hgrn') -> 'hgrn'" in listed
    # Rewritten as now only once its checkpoint has been restored (by train_and_evaluate).
    assert "use_lower_bound" not in json.loads(saved.read_text())["model"]

    # position_encoding is True in the LRA configs and False by default: an old run without the
    # key had no positions, so the new config changes its model.
    saved = _saved_run_without(tmp_path / "changed", config, "model.position_encoding")
    before = saved.read_bytes()
    with pytest.raises(
        ConfigChangedError, match=r"model\.position_encoding: absent \(default False\) -> True"
    ):
        prepare_workdir(tmp_path / "changed", config)
    assert saved.read_bytes() == before and not (tmp_path / "changed" / "run.lock").exists()


def test_data_keys_added_later_stand_for_what_older_runs_read(tmp_path):
    """``data.repeated_augmentation`` and ``data.wikitext_release`` change which examples a
    step reads: a change refuses the resume naming the key (it was listed as a setting that
    changes training from here on, and the input pipeline then refused it with no key named).
    In a run saved before they existed they stand for what it read (each image once an epoch;
    the tokens release); another task's older run, which reads neither, resumes."""
    from experiments.configs.imagenet import tiny as imagenet
    from experiments.configs.lm import wikitext103
    from experiments.configs.lra import listops
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangedError, ConfigChangeWarning

    config = imagenet.get_config("tiny")
    _saved_run_without(tmp_path / "imagenet", config, "data.repeated_augmentation")
    with pytest.raises(
        ConfigChangedError,
        match=r"data\.repeated_augmentation: absent \(saved before the key: 1\) -> 3",
    ):
        prepare_workdir(tmp_path / "imagenet", config)
    config.data.repeated_augmentation = 1
    with pytest.warns(ConfigChangeWarning, match="saved before the key: 1"):
        prepare_workdir(tmp_path / "imagenet", config).release()
    config = wikitext103.get_config("tiny")
    _saved_run_without(tmp_path / "lm", config, "data.wikitext_release")
    with pytest.raises(ConfigChangedError, match=r"data\.wikitext_release: absent \(saved before"):
        prepare_workdir(tmp_path / "lm", config)
    _saved_run_without(tmp_path / "lm-now", config)
    changed = config.copy_and_resolve_references()
    changed.data.wikitext_release = "tokens"
    with pytest.raises(ConfigChangedError, match=r"data\.wikitext_release: 'raw' -> 'tokens'"):
        prepare_workdir(tmp_path / "lm-now", changed)
    config = listops.get_config("tiny")
    _saved_run_without(tmp_path / "listops", config, "data.wikitext_release")
    with pytest.warns(ConfigChangeWarning, match=r"data\.wikitext_release: absent -> 'raw'"):
        prepare_workdir(tmp_path / "listops", config).release()


def test_a_run_resumes_on_another_mesh_with_the_sequence_split(tmp_path):
    """Moving a run to a pod and splitting its sequence there (``model.mixer.sequence_axis``,
    ``model.mixer.method``, ``mesh.*``) changes no parameter: it resumes, the changes listed as
    harmless. Only the flat, deprecated ``model.sequence_axis`` was counted so; the keys of
    ``model.mixer`` refused the resume as a changed model."""
    from experiments.configs.lra import listops
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangeWarning

    config = listops.get_config("tiny")
    _saved_run_without(tmp_path / "run", config)
    moved = config.copy_and_resolve_references()
    moved.mesh.update(data=2, fsdp=2, model=2)
    moved.model.mixer.sequence_axis = "model"
    moved.model.mixer.method = "sequential"
    with pytest.warns(ConfigChangeWarning) as caught:
        prepare_workdir(tmp_path / "run", moved).release()
    listed = " ".join(str(w.message) for w in caught)
    assert "model.mixer.sequence_axis: None -> 'model'" in listed
    assert "model.mixer.method: 'auto' -> 'sequential'" in listed


def test_input_workers_are_a_run_setting_so_runs_saved_without_the_key_resume(tmp_path):
    """``data.workers`` (in every config since docs/data.md lists it) leaves the batches as they
    are: a run saved before the key existed, or with another number of workers, resumes with the
    change listed as a run setting, not as one that changes training."""
    from experiments.configs.lra import listops
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangeWarning

    config = listops.get_config("tiny")
    _saved_run_without(tmp_path / "old", config, "data.workers")
    with pytest.warns(ConfigChangeWarning) as caught:
        prepare_workdir(tmp_path / "old", config).release()
    listed = " ".join(str(w.message) for w in caught)
    assert "resuming with new run settings: data.workers: absent -> 0" in listed
    assert "change training" not in listed


def test_a_forced_resume_lists_the_changed_model_with_the_other_changes(tmp_path):
    """--config.resume=force with a changed model and more steps: one warning lists every change,
    the model's first (as two warnings, the model's was missed above the run settings)."""
    from experiments.configs.lra import listops
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangeWarning

    config = listops.get_config("tiny")
    _saved_run_without(tmp_path / "run", config)
    forced = config.copy_and_resolve_references()
    forced.model.features, forced.num_train_steps, forced.resume = 48, 400, "force"
    with pytest.warns(ConfigChangeWarning) as caught:
        prepare_workdir(tmp_path / "run", forced).release()
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert re.fullmatch(
        r"resuming with changed model/data/optimizer settings \(--config\.resume=force\): "
        r"model\.features: 32 -> 48; and with new run settings: num_train_steps: \d+ -> 400; "
        r"resume: 'auto' -> 'force'",
        str(caught[0].message),
    ), str(caught[0].message)


def test_a_first_attempt_without_a_checkpoint_is_replaced_with_a_short_note(tmp_path):
    """An attempt that stopped before its first checkpoint (a wrong data folder, say) left its
    config.json; the corrected command, even with another config file, replaces it: one short
    note (it listed every one of dozens of changed keys), nothing refused."""
    from experiments.configs.lm import wikitext103
    from experiments.configs.lra import listops
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangeWarning

    _saved_run_without(tmp_path / "run", wikitext103.get_config("tiny"))
    (tmp_path / "run" / "checkpoints" / "1").rmdir()  # no checkpoint
    with pytest.warns(ConfigChangeWarning) as caught:
        prepare_workdir(tmp_path / "run", listops.get_config("tiny")).release()
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert re.fullmatch(
        rf"{tmp_path}/run/config\.json \(of an attempt that saved no checkpoint\) is replaced by "
        r"the new config \(batch_size: 16 -> 32; (?:[^;]+; ){5}and \d+ more\)",
        str(caught[0].message),
    ), str(caught[0].message)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "listops"


def test_absent_keys_of_a_user_task_still_refuse(tmp_path):
    """No defaults are known for a ``module:factory`` task: an absent model key is a change."""
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangedError

    config = _config()
    _saved_run_without(tmp_path / "run", config, "model.features")
    with pytest.raises(ConfigChangedError, match=r"model\.features: absent -> 16"):
        prepare_workdir(tmp_path / "run", config)


def test_a_changed_config_without_a_committed_checkpoint_is_accepted(tmp_path):
    """An attempt that failed before its first checkpoint left config.json (and maybe an
    unfinished Orbax folder): a structural change is accepted, and config.json replaced; one
    committed step folder makes the same change a refusal."""
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangedError, ConfigChangeWarning

    run = tmp_path / "run"
    prepare_workdir(run, _config()).release()
    (run / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
    changed = _config(**{"model.features": 8})
    with pytest.warns(
        ConfigChangeWarning, match=r"no checkpoint\) is replaced .*features: 16 -> 8"
    ):
        prepare_workdir(run, changed).release()
    assert json.loads((run / "config.json").read_text())["model"]["features"] == 8

    (run / "checkpoints" / "3").mkdir()
    with pytest.raises(ConfigChangedError, match=r"model\.features: 8 -> 16"):
        prepare_workdir(run, _config())
    assert json.loads((run / "config.json").read_text())["model"]["features"] == 8


@pytest.mark.slow
def test_resume_restart_keeps_the_previous_run_and_starts_again(copy_of_finished):
    run = copy_of_finished
    before = _tree_digest(run / "checkpoints")
    results = _run(_config(**{"model.features": 8, "resume": "restart"}), run)
    (previous,) = run.glob("previous-*")
    assert _tree_digest(previous / "checkpoints") == before
    assert (previous / "results.json").is_file() and (previous / "config.json").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["features"] == 8
    assert results["steps"] == 12


def test_flipped_bytes_fall_back_to_the_previous_checkpoint_without_a_nan_stop(
    copy_of_finished, finished
):
    run = copy_of_finished
    _flip_bytes(_largest_array_file(run / "checkpoints" / "12"))
    damaged_digest = _tree_digest(run / "checkpoints" / "12")
    with pytest.warns(RuntimeWarning, match=r"step 12.*moved it to .*checkpoints\.damaged"):
        results = _run(_config(), run)
    # Kept, renamed, bytes as found; training resumed at step 9 and redid steps 10-12.
    assert _tree_digest(run / "checkpoints.damaged" / "12") == damaged_digest
    for a, b in zip(
        _params(run / "checkpoints" / "12"),
        _params(finished[0] / "checkpoints" / "12"),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert results["test"] == finished[1]["test"]


def test_every_checkpoint_damaged_stops_instead_of_starting_over_the_run(copy_of_finished):
    """With each of its checkpoints damaged, a run moved them aside and started again from step
    0, writing its new metrics and results over the old ones (user review). It now stops, every
    file left as it was but the damaged checkpoints (moved aside, not deleted); a rerun, even
    with another config, stops the same way; --config.resume=restart keeps the whole run in a
    previous-<time>/ folder and starts again."""
    from hgrn_jax.training.checkpoint import CheckpointFallbackWarning, NoUsableCheckpointError
    from hgrn_jax.training.workdir import ConfigChangedError

    run = copy_of_finished
    for step in (6, 9, 12):
        _flip_bytes(_largest_array_file(run / "checkpoints" / str(step)))
    kept = {name: _tree_digest(run / name) for name in ("metrics.jsonl", "results.json")}
    config_json = (run / "config.json").read_text()
    message = (
        rf"^{run}/checkpoints holds no usable checkpoint: every one was damaged and moved to "
        rf"{run}/checkpoints\.damaged \(kept\); nothing else was changed\. .* rerun with "
        r"--config\.resume=restart"
    )
    with (
        pytest.warns(CheckpointFallbackWarning),
        pytest.raises(NoUsableCheckpointError, match=message),
    ):
        _run(_config(), run)
    assert sorted(p.name for p in (run / "checkpoints.damaged").iterdir()) == ["12", "6", "9"]
    with pytest.raises(NoUsableCheckpointError, match=message):
        _run(_config(), run)
    with pytest.raises(ConfigChangedError, match=r"model\.features: 16 -> 8"):
        _run(_config(**{"model.features": 8}), run)
    assert {name: _tree_digest(run / name) for name in kept} == kept
    assert (run / "config.json").read_text() == config_json
    results = _run(_config(resume="restart"), run)
    assert results["steps"] == 12 and len(list(run.glob("previous-*/checkpoints.damaged/*"))) == 3


def test_a_run_whose_checkpoints_were_deleted_is_not_trained_again_over_its_history(
    copy_of_finished,
):
    """Checkpoints deleted to save space (or purged from scratch storage), the same command
    rerun: the run started again from step 0, cut metrics.jsonl back to nothing and wrote its
    new results over the old (a review reproduced it). It stops, touching nothing, and names
    --config.resume=restart, which keeps the old run and starts again."""
    from hgrn_jax.training.workdir import WorkdirError

    run = copy_of_finished
    shutil.rmtree(run / "checkpoints")
    kept = _tree_digest(run)
    message = (
        rf"^{run} holds a finished run's results.json but no checkpoint in {run}/checkpoints "
        r"\(deleted\?\); nothing was changed\. .*--config\.resume=restart"
    )
    with pytest.raises(WorkdirError, match=message):
        _run(_config(), run)
    (run / "results.json").unlink()  # a run stopped before its end: its metrics tell
    kept = _tree_digest(run)
    with pytest.raises(WorkdirError, match=r"up to step 12 \(its first checkpoint is at step 3\)"):
        _run(_config(resume="force"), run)
    assert _tree_digest(run) == kept
    # A damaged line among the metrics that tell is named; it used to be skipped there (and
    # the last logged step taken from the others).
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    damaged = _tree_digest(run)
    with pytest.raises(ValueError, match=rf"^{metrics}:2 is not a JSON record"):
        _run(_config(), run)
    assert _tree_digest(run) == damaged
    metrics.write_text("\n".join(lines) + "\n")
    assert _run(_config(resume="restart"), run)["steps"] == 12
    assert _tree_digest(next(run.glob("previous-*"))) == kept


def test_deleted_checkpoints_are_noticed_when_evaluations_checkpoint_before_checkpoint_every(
    tmp_path,
):
    """The checkpoints were taken to be every checkpoint_every steps, but every evaluation
    saves one too: with checkpoint_every past the last step, a run whose checkpoints were
    deleted was trained again from step 0 and its metrics.jsonl emptied (a review reproduced
    it). Metrics past the second save (step 8) prove that the first one had completed."""
    from hgrn_jax.training.workdir import WorkdirError

    config = _config(checkpoint_every=100, eval_every=4)  # evaluations still checkpoint
    _run(config, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "results.json").unlink()
    kept = _tree_digest(tmp_path)
    with pytest.raises(WorkdirError, match=r"up to step 12 \(its first checkpoint is at step 4\)"):
        _run(config, tmp_path)
    assert _tree_digest(tmp_path) == kept


def test_a_run_killed_during_its_first_save_is_not_taken_for_deleted_checkpoints(tmp_path):
    """Saves run in the background, each waiting for the one before: a run killed during its
    first save (checkpoints/ holds Orbax's temporary folder) has logged up to its second. That
    resume was refused as a run whose checkpoints were deleted (test_kill_resume hit it);
    without a checkpoints/ folder at all, metrics past the first save still refuse."""
    from hgrn_jax.training.workdir import WorkdirError, _refuse_history_without_checkpoints

    saved = {"num_train_steps": 12, "checkpoint_every": 1, "eval_every": 4}
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n" for s in (1, 2))
    )
    (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp-17").mkdir(parents=True)
    _refuse_history_without_checkpoints(tmp_path, saved)
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(WorkdirError, match=r"up to step 2 \(its first checkpoint is at step 1\)"):
        _refuse_history_without_checkpoints(tmp_path, saved)


def test_a_checkpoint_past_fewer_steps_of_an_unfinished_run_is_refused(copy_of_finished):
    """A run stopped at step 12 resumed with num_train_steps=6 logged "resuming from step 12
    of 6", trained nothing and wrote results.json as a finished run (a review reproduced it)."""
    from hgrn_jax.training.workdir import ConfigChangedError

    run = copy_of_finished
    (run / "results.json").unlink()  # killed after its last checkpoint, before its test
    kept = _tree_digest(run)
    message = (
        rf"^the latest checkpoint in {run}/checkpoints is at step 12, past "
        r"--config.num_train_steps=6, of a run that has not finished; nothing was changed\. "
        r"Set num_train_steps to 12 or more"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # the new value, listed
        with pytest.raises(ConfigChangedError, match=message):
            _run(_config(num_train_steps=6), run)
    assert _tree_digest(run) == kept
    assert _run(_config(), run)["steps"] == 12


def test_a_changed_seed_is_refused_as_a_change_of_the_data_order(copy_of_finished):
    """A new seed was resumed with a warning, then the input pipeline refused its state
    without naming the seed (a review reproduced it): it reorders the examples of every step."""
    from hgrn_jax.training.workdir import ConfigChangedError

    run = copy_of_finished
    kept = _tree_digest(run)
    with pytest.raises(ConfigChangedError, match=r"new values \(seed: 0 -> 1\)"):
        _run(_config(seed=1), run)
    assert _tree_digest(run) == kept


def test_a_damaged_line_inside_metrics_jsonl_stops_the_resume_naming_it(copy_of_finished):
    """Rewinding metrics.jsonl on a resume dropped every line that was not JSON, wherever it
    stood (a review reproduced it): only a last line cut short by a kill is dropped; any other
    stops the run, naming the file and line, before anything changes."""
    run = copy_of_finished
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
    kept = _tree_digest(run)
    with pytest.raises(ValueError, match=rf"^{metrics}:3 is not a JSON record .*Mend or delete"):
        _run(_config(), run)
    assert _tree_digest(run) == kept

    metrics.write_bytes(b'{"step": 1, "split": "train", "loss": 1.0}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=rf"^{metrics} is not UTF-8 text"):
        _run(_config(), run)

    metrics.write_text("\n".join(lines) + '\n{"step": 12, "spl')  # a write cut short
    assert _run(_config(), run)["steps"] == 12
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r for r in records if r["split"] != "test"] == [
        json.loads(line) for line in lines if json.loads(line)["split"] != "test"
    ]


@pytest.mark.parametrize(
    "manifest",
    [{"files": []}, {"files": {"a": {"size": "3", "sha256": "00"}}}, {"files": {"a": 3}}, [1]],
)
def test_an_integrity_manifest_of_the_wrong_shape_is_a_damaged_checkpoint(tmp_path, manifest):
    from hgrn_jax.training import integrity

    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / integrity.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(integrity.DamagedCheckpointError, match=r"integrity\.json is unreadable"):
        integrity.verify(tmp_path)


@pytest.mark.parametrize("damage", ["cut_short", "deleted"])
def test_a_cut_short_or_lost_config_json_is_rebuilt_from_the_newest_checkpoint(
    copy_of_finished, damage
):
    """A config.json cut short (a power loss before the file system wrote it) stopped the run
    with advice that led to a dead end: moved away, the folder was refused as another
    program's, as was one whose config.json was deleted. Each checkpoint now holds a copy of
    the config: the run rebuilds config.json from the newest one (moving the bad file aside,
    not deleting it), says so in one line, and resumes."""
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangeWarning

    run = copy_of_finished
    config_json = run / "config.json"
    original = json.loads(config_json.read_text())
    copy = run / "checkpoints" / "12" / "config" / "metadata"
    assert json.loads(copy.read_text()) == original
    if damage == "cut_short":
        cut = config_json.read_bytes()[:100]
        config_json.write_bytes(cut)
        expected = (
            rf"^{config_json} is not JSON \(.+\): moved it to {config_json}\.unreadable and "
            rf"rebuilt {config_json} from the copy in {copy}$"
        )
    else:
        config_json.unlink()
        expected = rf"^{run} had lost its config\.json; rebuilt it from the copy in {copy}$"
    with pytest.warns(ConfigChangeWarning, match=expected):
        prepare_workdir(run, _config()).release()
    assert json.loads(config_json.read_text()) == original
    if damage == "cut_short":
        assert (run / "config.json.unreadable").read_bytes() == cut
    assert _run(_config(num_train_steps=15), run)["steps"] == 15
    assert _steps(run)[-1] == 15


def test_a_config_json_without_a_copy_in_the_checkpoints_still_stops_touching_nothing(
    copy_of_finished,
):
    """Checkpoints of an older version hold no copy of the config: a config.json that is not
    JSON, or none beside run files, stops the run in one line naming the file and the way out,
    every byte left as it was."""
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import WorkdirError

    run = copy_of_finished
    for copy in run.glob("checkpoints/*/config"):
        shutil.rmtree(copy)
    (run / "config.json").write_text("")
    before = _tree_digest(run)
    with pytest.raises(
        WorkdirError,
        match=rf"^{run}/config\.json is not JSON \(.+\) and no checkpoint of the run holds a "
        r"copy of its config .*; nothing was changed\. Put the run's config\.json back",
    ):
        prepare_workdir(run, _config())
    assert _tree_digest(run) == before
    (run / "config.json").unlink()
    before = _tree_digest(run)
    with pytest.raises(WorkdirError, match=r"holds checkpoints, metrics\.jsonl, .*but no config"):
        prepare_workdir(run, _config())
    assert _tree_digest(run) == before


def test_the_newest_checkpoint_is_certified_once_its_save_finishes(tmp_path):
    """The newest checkpoint got its checksums only when the next save started, so a run
    killed between two saves left it unverified. The loop asks after every step
    (``record_finished``): they are recorded once the background save has finished."""
    from hgrn_jax.training import integrity
    from hgrn_jax.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "ckpt", keep=3)
    checkpoints.save(1, {"w": jnp.arange(1000.0)}, {"step": 1})
    deadline = time.monotonic() + 60
    while not integrity.has_manifest(tmp_path / "ckpt" / "1"):
        assert time.monotonic() < deadline, "the checksums of step 1 were never recorded"
        checkpoints.record_finished()
        time.sleep(0.01)
    assert isinstance(integrity.verify(tmp_path / "ckpt" / "1"), integrity.Verified)
    checkpoints.close()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "remove_file"])
def test_truncated_or_missing_files_are_moved_aside_not_deleted(copy_of_finished, finished, damage):
    run = copy_of_finished
    target = _largest_array_file(run / "checkpoints" / "12")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    else:
        target.unlink()
    with pytest.warns(RuntimeWarning, match="step 12.*falling back"):
        results = _run(_config(), run)
    assert (run / "checkpoints.damaged" / "12" / "state").is_dir()
    assert results["test"] == finished[1]["test"]


@pytest.mark.slow
def test_a_damaged_checkpoint_without_checksums_falls_back_and_is_not_certified(
    copy_of_finished, finished
):
    """Checkpoints saved before checksums were recorded: a truncated one fails to restore, is
    moved aside and the previous one is used; no manifest is written over bytes this run did
    not save."""
    from hgrn_jax.training import integrity

    run = copy_of_finished
    for manifest in (run / "checkpoints").glob(f"*/{integrity.MANIFEST}"):
        manifest.unlink()
    for data in (run / "checkpoints" / "12" / "state").glob("**/d/*"):  # OCDBT data files
        data.write_bytes(data.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=r"step 12 .*moved it to .*checkpoints\.damaged"):
        results = _run(_config(), run)
    assert not integrity.has_manifest(run / "checkpoints.damaged" / "12")
    assert not integrity.has_manifest(run / "checkpoints" / "9")  # restored, not certified
    assert integrity.has_manifest(run / "checkpoints" / "12")  # saved again by this run
    assert results["test"] == finished[1]["test"]


def test_damaged_best_checkpoint_at_the_end_uses_the_next_best(copy_of_finished, finished):
    run = copy_of_finished
    six = run / "checkpoints" / "6"
    # Checkpoint 6 claims the best validation accuracy, and its arrays are damaged.
    metrics_file = six / "metrics" / "metrics"
    metrics_file.write_text(json.dumps({"val_accuracy": 99.0}))
    _flip_bytes(_largest_array_file(six))
    with pytest.warns(RuntimeWarning, match=r"step 6 .*damaged"):
        results = _run(_config(), run)
    assert (run / "checkpoints.damaged" / "6").is_dir()
    assert results["best_step"] == 12 and results["test"] == finished[1]["test"]
    assert json.loads((run / "results.json").read_text())["best_step"] == 12


def test_checksums_are_recorded_only_for_committed_checkpoints(tmp_path):
    from hgrn_jax.training import integrity
    from hgrn_jax.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "ckpt", keep=3)
    tree = {"w": jnp.arange(1000.0)}
    checkpoints.save(1, tree, {"step": 1})
    checkpoints.save(2, tree, {"step": 2})  # waits for step 1, then records its checksums
    assert integrity.has_manifest(tmp_path / "ckpt" / "1")
    checkpoints.wait()
    assert integrity.has_manifest(tmp_path / "ckpt" / "2")
    manifest = json.loads((tmp_path / "ckpt" / "2" / integrity.MANIFEST).read_text())
    assert any(name.startswith("state/") for name in manifest["files"])
    assert isinstance(integrity.verify(tmp_path / "ckpt" / "2"), integrity.Verified)
    _flip_bytes(_largest_array_file(tmp_path / "ckpt" / "2"), count=1)
    with pytest.raises(integrity.DamagedCheckpointError, match="checksum"):
        integrity.verify(tmp_path / "ckpt" / "2")
    checkpoints.close()


def test_an_unverified_checkpoint_that_does_not_restore_is_moved_aside_uncertified(tmp_path):
    """Without checksums (older code, or a run killed before recording them) a checkpoint whose
    array data is truncated fails to restore: it is moved aside and the previous one restored
    unverified; the checksums of folders another run wrote are never recorded."""
    from hgrn_jax.training import integrity
    from hgrn_jax.training.checkpoint import (
        CheckpointFallbackWarning,
        Checkpoints,
        CheckpointUnverifiedWarning,
    )

    folder = tmp_path / "ckpt"
    tree = {"w": jnp.arange(100_000.0)}  # large enough to be stored outside the OCDBT index
    earlier = Checkpoints(folder, keep=3, async_save=False)
    earlier.save(1, tree, {"step": 1})
    earlier.save(2, jax.tree.map(lambda x: 2 * x, tree), {"step": 2})
    earlier.close()
    for manifest in folder.glob(f"*/{integrity.MANIFEST}"):
        manifest.unlink()
    data = max((folder / "2" / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])

    checkpoints = Checkpoints(folder, keep=3)
    with (
        pytest.warns(CheckpointFallbackWarning, match=r"step 2 .*moved it to .*ckpt\.damaged"),
        pytest.warns(CheckpointUnverifiedWarning),
    ):
        step, restored, meta = checkpoints.restore_latest(jax.eval_shape(lambda: tree))
    checkpoints.close()
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(100_000.0))
    assert (tmp_path / "ckpt.damaged" / "2" / "state").is_dir()
    assert not integrity.has_manifest(tmp_path / "ckpt.damaged" / "2")
    assert not integrity.has_manifest(folder / "1")


def test_rerunning_a_finished_run_with_fewer_steps_leaves_its_config_json(copy_of_finished):
    """A finished run rerun with fewer steps and another learning rate trains nothing, but its
    config.json took the new values: it then described a run that never ran (a user's
    review)."""
    run = copy_of_finished
    saved = (run / "config.json").read_bytes()
    changed = _config(num_train_steps=6, **{"optimizer.learning_rate": 1e-4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # the new values, listed
        assert _run(changed, run)["steps"] == 12
    assert (run / "config.json").read_bytes() == saved


def test_a_resume_refused_by_the_input_pipeline_leaves_config_json(tmp_path):
    """config.json was written before the input pipeline's state was restored: a resume that
    the pipeline refused (batch size changed with resume=force) left the new settings in it,
    and the original command was then refused as a config change (a review reproduced it)."""
    _run(_config(num_train_steps=6, **{"data.grain": True}), tmp_path)
    saved = _tree_digest(tmp_path)
    changed = _config(num_train_steps=12, batch_size=16, resume="force", **{"data.grain": True})
    with pytest.raises(ValueError, match="cannot resume the input pipeline at step 6"):
        _run(changed, tmp_path)
    assert _tree_digest(tmp_path) == saved  # config.json, and metrics.jsonl's test records
    assert _run(_config(num_train_steps=9, **{"data.grain": True}), tmp_path)["steps"] == 9


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"),
        MemoryError(),
        RuntimeError("UNAVAILABLE: the storage service did not answer"),
    ],
)
def test_an_unverified_checkpoint_that_fails_for_want_of_memory_is_kept(
    tmp_path, monkeypatch, failure
):
    """The newest checkpoint has no checksums until the next save records them. One that failed
    to restore for any reason but an unreadable file was moved aside as damaged, and the run went
    on from an older one: a device out of memory on a resume over fewer devices cost the user
    every step since (a review reproduced it). A failure of the machine, not of the files,
    stops the run with the checkpoint in place."""
    from hgrn_jax.training import integrity
    from hgrn_jax.training.checkpoint import Checkpoints

    folder = tmp_path / "ckpt"
    tree = {"w": jnp.arange(1000.0)}
    earlier = Checkpoints(folder, keep=3, async_save=False)
    earlier.save(1, tree, {"step": 1})
    earlier.save(2, tree, {"step": 2})
    earlier.close()
    (folder / "2" / integrity.MANIFEST).unlink()
    before = _tree_digest(folder)

    def fails(*args, **kwargs):
        raise failure

    checkpoints = Checkpoints(folder, keep=3)
    monkeypatch.setattr(checkpoints.manager, "restore", fails)
    with (
        warnings.catch_warnings(),
        pytest.raises(
            integrity.CheckpointError,
            match=r"did not restore for a reason that is not damage to its files .*nothing was "
            r"changed\. Free what it needs",
        ),
    ):
        warnings.simplefilter("ignore", category=RuntimeWarning)  # restoring it unverified
        checkpoints.restore_latest(jax.eval_shape(lambda: tree))
    checkpoints.close()
    assert _tree_digest(folder) == before and not (tmp_path / "ckpt.damaged").exists()


# ----------------------------------------------------------------------------------------------
# Unreadable checkpoints: exit 2, one line, nothing touched
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, expected",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "CheckpointUnreadableError"),
        (OSError(errno.EIO, "Input/output error"), "CheckpointUnreadableError"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), "DamagedCheckpointError"),
    ],
)
def test_os_errors_are_classified(error, expected):
    from hgrn_jax.training import integrity

    assert type(integrity.classify_os_error(error, "/x/state/d/1")).__name__ == expected


def _open_files_under(folder: Path) -> list[str]:
    """The files under ``folder`` that this process holds open (Linux: /proc/self/fd)."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(folder) + os.sep):
                held.append(target)
    return held


def test_injected_permission_error_stops_the_restore_touching_nothing(
    copy_of_finished, monkeypatch
):
    from hgrn_jax.training import integrity
    from hgrn_jax.training.checkpoint import CheckpointUnreadableError

    run = copy_of_finished
    before = _tree_digest(run)
    real_digest = integrity._digest

    def digest(path):
        if "/12/state/" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_digest(path)

    monkeypatch.setattr(integrity, "_digest", digest)
    with pytest.raises(CheckpointUnreadableError, match=r"permission denied.*read access"):
        _run(_config(), run)
    assert _tree_digest(run) == before
    # The failed run closed what it had opened (metrics.jsonl was left open, for a script that
    # goes on after the error to carry, until the garbage collector warned about it).
    assert _open_files_under(run) == []
    assert not (run / "checkpoints.damaged").exists() and not (run / "run.lock").exists()


def test_unreadable_checkpoint_file_as_an_unprivileged_user(shared_tmp, finished):
    from hgrn_jax.training import integrity

    folder = shared_tmp / "12"
    shutil.copytree(finished[0] / "checkpoints" / "12", folder)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    secret = _largest_array_file(folder)
    os.chmod(secret, 0o000)
    outcome = _as_unprivileged(lambda: integrity.verify(folder))
    assert outcome.startswith("CheckpointUnreadableError"), outcome
    assert str(secret) in outcome and "permission denied" in outcome
    os.chmod(secret, 0o644)
    assert _as_unprivileged(lambda: integrity.verify(folder)) == "ok"


# ----------------------------------------------------------------------------------------------
# One run per workdir
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(workdir: Path, **holder) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir / "run.lock"
    lock.write_text(
        json.dumps({"host": socket.gethostname(), "start_time": "2026-01-01T00:00:00", **holder})
    )
    return lock


def test_a_held_lock_stops_a_second_run_before_it_writes_anything(tmp_path, other_process):
    from hgrn_jax.training.workdir import WorkdirInUseError

    lock = _write_lock(tmp_path, pid=other_process.pid)
    with pytest.raises(
        WorkdirInUseError, match=rf"in use by another run .*pid {other_process.pid}"
    ):
        _run(_config(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    assert json.loads(lock.read_text())["pid"] == other_process.pid


def test_a_lock_from_another_host_says_how_to_clear_it(tmp_path):
    from hgrn_jax.training.workdir import WorkdirInUseError

    lock = _write_lock(tmp_path, host="some-other-host", pid=1)
    with pytest.raises(
        WorkdirInUseError, match=rf"host some-other-host.*delete {re.escape(str(lock))}"
    ):
        _run(_config(), tmp_path)


def test_a_lock_of_another_host_that_stopped_refreshing_is_taken_over(tmp_path, monkeypatch):
    """A job requeued on another node after its node died found the dead run's lock, which no
    process of this host can check, and stopped until someone deleted it. The holder refreshes
    its lock every heartbeat_s; one left unchanged for LOCK_STALE_BEATS of them is taken
    over with a warning saying so."""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import StaleLockWarning, WorkdirLock

    monkeypatch.setattr(workdir_module, "LOCK_POLL_S", 0.02)
    _write_lock(tmp_path, host="some-other-host", pid=7, heartbeat_s=0.1)
    stale_s = workdir_module.LOCK_STALE_BEATS * 0.1
    with pytest.warns(
        StaleLockWarning,
        match=rf"on host some-other-host, which did not refresh it in {stale_s:g} s",
    ):
        lock = WorkdirLock(tmp_path).acquire()
    assert json.loads(lock.path.read_text())["token"] == lock.token
    lock.release()
    assert not lock.path.exists()


def test_a_lock_is_judged_before_a_pod_s_other_processes_give_up_waiting():
    """Process 0 watches another host's lock while the pod's other processes wait for it in
    their first collective, whose gloo rendezvous gives up after 30 s (a 90 s watch made them
    exit 3); the default watch must leave room for start-up jitter."""
    from hgrn_jax.training import workdir as workdir_module

    watch_s = workdir_module.LOCK_STALE_BEATS * workdir_module.LOCK_HEARTBEAT_S
    assert watch_s + workdir_module.LOCK_POLL_S <= 21


def test_a_refreshed_lock_of_another_host_is_a_live_run_s(tmp_path, monkeypatch):
    """The holder on the other host refreshes its lock while this run watches it: this run
    stops as soon as it sees that, naming the holder, and leaves the lock alone."""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import WorkdirInUseError, WorkdirLock

    monkeypatch.setattr(workdir_module, "LOCK_POLL_S", 0.02)
    lock = _write_lock(tmp_path, host="some-other-host", pid=7, heartbeat_s=10)
    before = lock.read_bytes()
    holder = threading.Timer(0.2, lambda: os.utime(lock, ns=(1, time.time_ns())))
    holder.start()
    started = time.monotonic()
    with pytest.raises(
        WorkdirInUseError,
        match=r"in use by a live run \(host some-other-host, pid 7.*changed a moment ago",
    ):
        WorkdirLock(tmp_path).acquire()
    holder.join()
    assert time.monotonic() - started < 10  # not the 40 s of four missed heartbeats
    assert lock.read_bytes() == before


def test_a_lock_of_this_host_whose_pid_went_to_another_process_is_taken_over(
    tmp_path, monkeypatch, other_process
):
    """A run that died long ago, whose pid now belongs to another process, used to block every
    rerun (its pid is alive). A lock not refreshed for longer than its stale limit is watched
    and taken over; a fresh one of a live pid is refused at once, as before. (A lock without
    the holder's start: written before runs recorded it, or where there is no /proc.)"""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import StaleLockWarning, WorkdirInUseError, WorkdirLock

    monkeypatch.setattr(workdir_module, "LOCK_POLL_S", 0.02)
    lock = _write_lock(tmp_path, pid=other_process.pid, heartbeat_s=30)
    with pytest.raises(
        WorkdirInUseError, match=rf"in use by another run .*pid {other_process.pid}"
    ):
        WorkdirLock(tmp_path).acquire()  # refreshed a moment ago: a live run
    lock = _write_lock(tmp_path, pid=other_process.pid, heartbeat_s=0.1)
    os.utime(lock, (0, 0))  # not refreshed since 1970
    stale_s = workdir_module.LOCK_STALE_BEATS * 0.1
    with pytest.warns(StaleLockWarning, match=rf"which did not refresh it in {stale_s:g} s"):
        WorkdirLock(tmp_path).acquire().release()
    assert not lock.exists()


@pytest.fixture
def suspended_process(other_process):
    """``other_process`` stopped as Ctrl-Z stops a job (SIGSTOP; SIGTSTP from a terminal)."""
    from hgrn_jax.training.workdir import process_status

    os.kill(other_process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while (process_status(other_process.pid) or ("?",))[0] != "T":
        assert time.monotonic() < deadline, "the process did not stop"
        time.sleep(0.01)
    return other_process


def _started_as(pid: int) -> dict:
    """The lock fields of a run that is process ``pid`` of this machine."""
    from hgrn_jax.training.workdir import process_status, this_machine

    return {"machine": this_machine(), "process_start": process_status(pid)[1]}


def test_a_run_s_lock_names_its_machine_and_process_start(tmp_path):
    from hgrn_jax.training.workdir import WorkdirLock, lock_state

    lock = WorkdirLock(tmp_path).acquire()
    record = json.loads(lock.path.read_text())
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert record["machine"] == f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    with open(f"/proc/{os.getpid()}/stat") as stat:
        assert record["process_start"] == int(stat.read().rsplit(")", 1)[1].split()[19])
    assert lock_state(tmp_path) == ("live", record)
    lock.release()


def test_a_process_s_status_is_read_whatever_its_name():
    """/proc/PID/stat puts the process's name in parentheses; a name may hold ")" and spaces."""
    from hgrn_jax.training.workdir import process_status

    renames_itself = (
        "import time; print(open('/proc/self/stat').read().split()[21], flush=True); "
        "open('/proc/self/comm', 'w').write('x) (y z'); print('renamed', flush=True); "
        "time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", renames_itself], stdout=subprocess.PIPE)
    try:
        start = int(child.stdout.readline())
        assert child.stdout.readline() == b"renamed\n"
        assert Path(f"/proc/{child.pid}/stat").read_text().count(")") == 2
        state, started = process_status(child.pid)
        assert state in "RS" and started == start  # running to its sleep, or sleeping
    finally:
        child.kill()
        child.wait()
    assert process_status(child.pid) is None


def test_a_suspended_run_keeps_its_lock_however_long_it_stood_still(
    tmp_path, monkeypatch, suspended_process
):
    """A run stopped by Ctrl-Z stops refreshing its lock. Judged by the refresh alone, its lock
    looked like that of a dead run whose pid went to another process, and the next run on the
    folder took it over after 20 s: two runs on one folder once the first was resumed. A lock
    of this machine records its process's start, so the process is looked up exactly: the
    next run stops at once, saying how to resume or end the suspended one."""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import WorkdirInUseError, WorkdirLock, lock_state

    monkeypatch.setattr(workdir_module, "LOCK_POLL_S", 0.02)
    pid = suspended_process.pid
    lock = _write_lock(tmp_path, pid=pid, heartbeat_s=0.1, **_started_as(pid))
    os.utime(lock, (0, 0))  # not refreshed since 1970
    before = lock.read_bytes()
    with pytest.raises(
        WorkdirInUseError,
        match=rf"in use by a suspended run \(host .*, pid {pid}.*kill -CONT {pid}\)",
    ):
        WorkdirLock(tmp_path).acquire()
    assert lock.read_bytes() == before
    assert lock_state(tmp_path)[0] == "suspended"
    os.kill(pid, signal.SIGCONT)
    with pytest.raises(WorkdirInUseError, match=rf"in use by another run .*pid {pid}"):
        WorkdirLock(tmp_path).acquire()  # running again: refused as any live run
    assert lock.read_bytes() == before


def test_a_lock_whose_pid_names_a_later_process_is_taken_over_at_once(
    tmp_path, monkeypatch, other_process
):
    """A fresh lock naming a live pid was refused: the pid could be the run's. With the run's
    start recorded, a live process that started at another moment is not the run (its pid was
    reused): the lock is taken over at once, without watching it."""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import StaleLockWarning, WorkdirLock, lock_state

    monkeypatch.setattr(workdir_module, "LOCK_POLL_S", 0.02)
    started = _started_as(other_process.pid)
    started["process_start"] -= 1
    lock = _write_lock(tmp_path, pid=other_process.pid, heartbeat_s=30, **started)
    assert lock_state(tmp_path)[0] == "dead"
    begun = time.monotonic()
    with pytest.warns(
        StaleLockWarning, match=rf"left by a run that is gone .*pid {other_process.pid}"
    ):
        WorkdirLock(tmp_path).acquire().release()
    assert time.monotonic() - begun < 30  # not watched for 4 x 30 s
    assert not lock.exists()


def test_a_lock_of_another_machine_with_this_host_name_is_watched_not_looked_up(
    tmp_path, monkeypatch
):
    """Two machines (containers, a rebooted node) may share a host name. The pid of a lock
    written by the other was looked up here: a pid not running here had its lock taken over at
    once, however live its run. A lock of another machine is watched as another host's."""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import (
        StaleLockWarning,
        WorkdirInUseError,
        WorkdirLock,
        lock_state,
    )

    monkeypatch.setattr(workdir_module, "LOCK_POLL_S", 0.02)
    other = {"machine": "another-boot/4026531836", "process_start": 12}
    lock = _write_lock(tmp_path, pid=_dead_pid(), heartbeat_s=10, **other)
    assert lock_state(tmp_path)[0] == "unchecked"
    beat = threading.Timer(0.2, lambda: os.utime(lock, ns=(1, time.time_ns())))
    beat.start()
    with pytest.raises(WorkdirInUseError, match=r"in use by a live run .*changed a moment ago"):
        WorkdirLock(tmp_path).acquire()
    beat.join()
    assert lock.exists()
    _write_lock(tmp_path, pid=_dead_pid(), heartbeat_s=0.1, **other)
    with pytest.warns(StaleLockWarning, match=r"which did not refresh it in 0.4 s"):
        WorkdirLock(tmp_path).acquire().release()


def test_a_held_lock_is_refreshed_every_heartbeat_until_released(tmp_path, monkeypatch):
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import WorkdirLock

    monkeypatch.setattr(workdir_module, "LOCK_HEARTBEAT_S", 0.02)
    lock = WorkdirLock(tmp_path).acquire()
    assert json.loads(lock.path.read_text())["heartbeat_s"] == 0.02
    os.utime(lock.path, (0, 0))
    deadline = time.monotonic() + 10
    while os.stat(lock.path).st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.stat(lock.path).st_mtime > 0, "the heartbeat did not refresh the lock"
    heartbeat = lock._heartbeat
    lock.release()
    assert not heartbeat.is_alive() and not lock.path.exists()


def test_a_run_refreshes_its_lock_and_stops_before_saving_once_it_is_not_its_own(
    tmp_path, monkeypatch
):
    """The heartbeat keeps the lock's modification time fresh. If the lock stops naming this
    run (taken over while this process stood still for longer than the stale limit, or deleted
    by hand and taken by another run), the run raises WorkdirInUseError at its next checkpoint
    instead of writing one into a folder another run may be using, and leaves that run's lock
    in place."""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import WorkdirInUseError

    monkeypatch.setattr(workdir_module, "LOCK_HEARTBEAT_S", 0.02)
    lock, step_folder = tmp_path / "run.lock", tmp_path / "checkpoints" / "3"
    other = {"host": "some-other-host", "pid": 7, "token": "not-this-run-s", "heartbeat_s": 30}

    def take_the_lock_after_the_first_checkpoint():
        deadline = time.monotonic() + 60
        while not step_folder.is_dir() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.utime(lock, ns=(0, 0))
        while os.stat(lock).st_mtime_ns == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # refreshed by the heartbeat
        (tmp_path / "other.lock").write_text(json.dumps(other))
        os.replace(tmp_path / "other.lock", lock)  # whole: the heartbeat never reads it empty

    thief = threading.Thread(target=take_the_lock_after_the_first_checkpoint)
    thief.start()
    config = _config(checkpoint_every=3, **{"data.sleep_per_step": 0.15})  # time for the thief
    with pytest.raises(WorkdirInUseError, match=r"no longer names this run: it names another run"):
        _run(config, tmp_path)
    thief.join()
    assert json.loads(lock.read_text()) == other
    assert not (tmp_path / "checkpoints" / "12").exists()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    with pytest.warns(RuntimeWarning, match=rf"left by a run that is gone .*pid {dead.pid}"):
        results = _run(_config(num_train_steps=6), tmp_path)
    assert results["steps"] == 6
    assert not (tmp_path / "run.lock").exists()  # released at the end


# Takes the lock in a child that SIGKILLs itself just before its file-system operation number
# sys.argv[2] (counted by an audit hook from the start of acquire()); exits 0 if there are fewer.
_KILLED_WHILE_LOCKING = """
import os, signal, sys
from hgrn_jax.training.workdir import WorkdirLock
count = 0
def die_at(event, args):
    global count
    if event in ("open", "os.link", "os.remove", "os.rename", "os.mkdir", "os.truncate"):
        count += 1
        if count == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(die_at)
WorkdirLock(sys.argv[1]).acquire()
"""


def test_a_run_killed_at_any_moment_while_taking_the_lock_never_blocks_the_next(tmp_path):
    """Killed before each file-system operation of taking the lock (and after the last), the
    process leaves no lock or a complete one, which the next run takes over. A lock created empty
    and then written was left empty by a kill in between (the first run of the kill test hit
    it), and an empty lock names no holder: every later run stopped at it."""
    from hgrn_jax.training.workdir import StaleLockWarning, WorkdirLock

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    moments = 0
    for kill_at in range(1, 20):
        workdir = tmp_path / str(kill_at)
        child = subprocess.run(
            [sys.executable, "-c", _KILLED_WHILE_LOCKING, str(workdir), str(kill_at)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode in (0, -signal.SIGKILL), child.stderr
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lock = WorkdirLock(workdir).acquire()
        # A ResourceWarning is the garbage collector finalising another test's leftover at
        # this moment (it failed here under `make test-fast`'s order), not the lock's.
        lock_warnings = [w for w in caught if not issubclass(w.category, ResourceWarning)]
        assert [w.category for w in lock_warnings] in ([], [StaleLockWarning]), [
            (w.category.__name__, str(w.message)[:300]) for w in lock_warnings
        ]
        assert sorted(p.name for p in workdir.iterdir()) == ["run.lock"]  # no stray record
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        lock.release()
        moments += 1
        if child.returncode == 0:  # not killed: it held the lock and left it behind
            assert caught, "the lock of a process that exited was not taken over"
            break
    assert moments >= 4, "taking the lock did fewer file-system operations than expected"


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_the_lock_is_taken_on_a_file_system_without_hard_links(tmp_path, monkeypatch, code):
    from hgrn_jax.training.workdir import WorkdirInUseError, WorkdirLock

    def no_hard_links(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_hard_links)
    lock = WorkdirLock(tmp_path).acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirInUseError, match="in use by another run"):
        WorkdirLock(tmp_path).acquire()
    lock.release()
    assert not lock.path.exists()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("runs", [2, 3])
def test_runs_taking_over_one_stale_lock_at_once_leave_exactly_one_holder(
    tmp_path, monkeypatch, runs
):
    """Each run judges the stale lock dead and, before it acts on that, the next run takes the
    lock whole (the last one undisturbed). The takeover renamed the path it had judged stale:
    it moved the faster run's live lock away and made its own, and every run held the workdir
    (with 2 runs: the review's forced interleaving)."""
    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import StaleLockWarning, WorkdirInUseError, WorkdirLock

    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    locks = [WorkdirLock(tmp_path) for _ in range(runs)]
    waiting, refused = list(locks[1:]), []
    process_alive = workdir_module._process_alive

    def acquire(lock):
        try:
            lock.acquire()
        except WorkdirInUseError as error:
            refused.append((lock, str(error)))

    def next_run_takes_the_lock_meanwhile(pid):
        if waiting:
            acquire(waiting.pop(0))
        return process_alive(pid)

    monkeypatch.setattr(workdir_module, "_process_alive", next_run_takes_the_lock_meanwhile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acquire(locks[0])
    holders = [i for i, lock in enumerate(locks) if lock.held]
    assert holders == [runs - 1], f"runs {holders} of {runs} hold the workdir"
    assert json.loads(locks[-1].path.read_text())["token"] == locks[-1].token
    assert [lock for lock, _ in refused] == locks[-2::-1]
    assert all(f"pid {os.getpid()}" in message for _, message in refused)
    taken_over = [w for w in caught if w.category is StaleLockWarning]
    assert len(taken_over) == 1 and f"pid {dead}" in str(taken_over[0].message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    locks[-1].release()
    assert not locks[-1].path.exists()


def test_a_stale_lock_that_cannot_be_locked_is_left_for_the_user_to_delete(tmp_path, monkeypatch):
    """Where flock fails (NFS without a lock service), taking the stale lock over could remove
    the lock of a run that took it over just before; the lock stays and the error says what to
    delete."""
    import fcntl

    from hgrn_jax.training.workdir import WorkdirInUseError, WorkdirLock

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = _write_lock(tmp_path, pid=_dead_pid())
    before = lock.read_bytes()
    with pytest.raises(
        WorkdirInUseError,
        match=rf"gone .*cannot be locked .*\(No locks available\); .*delete {re.escape(str(lock))}$",
    ):
        WorkdirLock(tmp_path).acquire()
    assert lock.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


@pytest.mark.slow
def test_the_lock_is_released_after_a_failed_run(tmp_path):
    from hgrn_jax.training.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):
        _run(_config(**{"data.nan_at_step": 2}), tmp_path)
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_two_runs_at_once_the_second_fails_naming_the_holder(tmp_path):
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.train",
            f"--config={TOY_CONFIG}",
            f"--workdir={tmp_path}",
            "--config.data.sleep_per_step=0.3",
            # Ended by SIGTERM below; enough steps to outlive the second run's start on a busy
            # machine (12 steps, 3.6 s, ended first once, and the second resumed its run).
            "--config.num_train_steps=2000",
        ],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run.lock").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = _train(TOY_CONFIG, tmp_path, "--config.optimizer.learning_rate=0.5")
        assert first.poll() is None, "the first run ended before the second started"
        _assert_one_line_usage_error(second, rf"in use by another run .*pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == 0.01  # the first run's, not the second's


def test_a_folder_with_run_files_but_no_config_is_not_taken_over(tmp_path):
    """Someone else's checkpoints/ and metrics.jsonl without a config.json: refused in one line,
    every byte left as it was (restart included); a folder left by a run killed between taking
    its lock and writing config.json (only the stale lock) is still used."""
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import WorkdirError

    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "3").mkdir(parents=True)
    (foreign / "checkpoints" / "3" / "model.pt").write_text("w")
    (foreign / "metrics.jsonl").write_text('{"a": 1}\nuser log line\n')
    before = _tree_digest(foreign)
    for resume in ("auto", "restart"):
        with pytest.raises(
            WorkdirError,
            match=r"holds checkpoints, metrics\.jsonl but no config\.json.*new --workdir",
        ) as caught:
            prepare_workdir(foreign, _config(resume=resume))
        assert "\n" not in str(caught.value) and str(foreign) in str(caught.value)
        assert _tree_digest(foreign) == before
        assert sorted(p.name for p in foreign.iterdir()) == ["checkpoints", "metrics.jsonl"]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / "killed"
    _write_lock(killed, pid=dead.pid)
    with pytest.warns(RuntimeWarning, match="left by a run that is gone"):
        prepare_workdir(killed, _config()).release()
    assert (killed / "config.json").is_file()


def test_another_program_s_config_json_is_neither_replaced_nor_moved(tmp_path):
    """A --workdir holding another program's config.json (a model folder's, say) and no
    checkpoint: the run took it for an attempt that saved none and replaced it (restart moved
    it). Now refused in one line, every byte left as it was; a run's own config.json without a
    checkpoint is still replaced."""
    from hgrn_jax.training.loop import prepare_workdir
    from hgrn_jax.training.workdir import ConfigChangeWarning, WorkdirError

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "n_embd": 768}')
    (folder / "weights.bin").write_text("w")
    before = _tree_digest(folder)
    for resume in ("auto", "restart", "force"):
        with pytest.raises(WorkdirError) as caught:
            prepare_workdir(folder, _config(resume=resume))
        assert str(caught.value) == (
            f"{folder / 'config.json'} is not the config of a run of this program (it has no "
            "task and model); nothing was changed. Choose an empty or new --workdir"
        )
        assert _tree_digest(folder) == before
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.bin"]
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text(json.dumps(_config(**{"model.features": 8}).to_dict()))
    with pytest.warns(ConfigChangeWarning, match=r"no checkpoint\) is replaced"):
        prepare_workdir(own, _config()).release()


def test_restart_moves_config_json_last(tmp_path, monkeypatch):
    """An archive cut short leaves config.json beside the files not yet moved."""
    from hgrn_jax.training import workdir

    run = tmp_path / "run"
    (run / "checkpoints" / "3").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    rename = os.rename
    moved = []

    def rename_once(source, destination):
        if moved:
            raise KeyboardInterrupt  # killed during the second move
        moved.append(Path(source).name)
        rename(source, destination)

    monkeypatch.setattr(workdir.os, "rename", rename_once)
    with pytest.raises(KeyboardInterrupt):
        workdir.archive_previous_run(run)
    assert moved == ["checkpoints"] and (run / "config.json").is_file()


def test_lock_outcome_reaches_every_process(monkeypatch):
    from hgrn_jax.training import agreement

    # Process 1's view: process 0 failed to take the lock (broadcast says 1).
    monkeypatch.setattr(agreement, "broadcast_code", lambda code: 1)
    with pytest.raises(agreement.StoppedByProcessZero, match="process 0 stopped"):
        agreement.share_outcome(None, "preparing /w")
    monkeypatch.setattr(agreement, "broadcast_code", lambda code: 0)
    agreement.share_outcome(None, "preparing /w")  # process 0 succeeded: everyone goes on


@pytest.mark.parametrize("failing_call", [1, 2], ids=["building the task", "opening splits"])
def test_a_data_error_on_another_process_stops_this_one_before_training(
    tmp_path, monkeypatch, failing_call
):
    """Process 1 of a pod cannot open its data (a folder missing on its host) while building
    the task (the first agreement) or opening the splits (the second). Seen from process 0:
    it stops too, naming process 1, before any training step. (It used to go on into its
    first step's collective and wait there for process 1, which had exited with its error:
    `a collective failed: a peer process was probably lost`, exit 3, in the simulated pod.)"""
    from hgrn_jax.training import agreement

    calls = []

    def failed_processes(failed: bool) -> list[int]:
        calls.append(failed)
        return [1] if len(calls) == failing_call else []

    monkeypatch.setattr(agreement, "failed_processes", failed_processes)
    workdir = tmp_path / "run"
    with pytest.raises(agreement.StoppedByAnotherProcess, match="^process 1 stopped while"):
        train_and_evaluate(_config(), workdir)
    assert calls == [False] * failing_call
    assert not list((workdir / "checkpoints").glob("*")) and not (workdir / "results.json").exists()


def test_an_unwritable_workdir_is_named(shared_tmp, monkeypatch):
    from hgrn_jax.training.workdir import WorkdirLock, WorkdirNotWritableError

    read_only = shared_tmp / "read_only"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    outcome = _as_unprivileged(lambda: WorkdirLock(read_only).acquire())
    assert outcome.startswith("WorkdirNotWritableError"), outcome
    assert f"cannot write to {read_only}" in outcome and "writable --workdir" in outcome

    # The same classification with an injected error (runs as root too).
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(WorkdirNotWritableError, match="Read-only file system"):
        WorkdirLock(shared_tmp / "elsewhere").acquire()


def test_unwritable_checkpoints_are_named_before_training(shared_tmp):
    """A checkpoints/ folder this user cannot write (owned by another user, a read-only mount)
    was found at the first save, after checkpoint_every steps of training were lost."""
    from hgrn_jax.training.workdir import check_checkpoints_writable

    workdir = shared_tmp / "run"
    (workdir / "checkpoints" / "6").mkdir(parents=True)
    os.chmod(workdir / "checkpoints", 0o555)
    outcome = _as_unprivileged(lambda: check_checkpoints_writable(workdir))
    assert outcome == (
        f"WorkdirNotWritableError: cannot write new checkpoints into {workdir}/checkpoints "
        "(Permission denied); nothing was changed. Give this user write access to it (and to "
        "the workdir), or copy the run to a writable --workdir and run there"
    )
    os.chmod(workdir / "checkpoints", 0o777)  # writable by all: the probe leaves nothing
    assert _as_unprivileged(lambda: check_checkpoints_writable(workdir)) == "ok"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6"]


@pytest.mark.parametrize("errno_code", [errno.EROFS, errno.ENOSPC], ids=["read_only", "full"])
def test_a_resume_into_unwritable_checkpoints_stops_before_training(
    copy_of_finished, monkeypatch, errno_code
):
    """The whole run, as root (whom permissions do not bind): the probe's folder cannot be
    made. The run stops before its first step, naming the folder (or the full file system),
    and leaves every file as it was."""
    from hgrn_jax.training.workdir import WorkdirFullError, WorkdirNotWritableError

    before = _tree_digest(copy_of_finished)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".write-check-"):
            raise OSError(errno_code, os.strerror(errno_code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    if errno_code == errno.EROFS:
        expected = (WorkdirNotWritableError, "cannot write new checkpoints into .*checkpoints")
    else:
        expected = (WorkdirFullError, "No space left on device on the file system of .*step 12")
    with pytest.raises(expected[0], match=expected[1]):
        _run(_config(num_train_steps=15), copy_of_finished)
    assert _tree_digest(copy_of_finished) == before
    assert not (copy_of_finished / "run.lock").exists()


def test_a_workdir_that_is_a_file_is_named_so(tmp_path):
    """A --workdir that is a file, or below one, is named as a file (the OSError said only
    'File exists' or 'Not a directory' and the fix was to mend permissions)."""
    from hgrn_jax.training.workdir import WorkdirLock, WorkdirNotWritableError

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(WorkdirNotWritableError) as raised:
        WorkdirLock(a_file).acquire()
    assert str(raised.value) == (
        f"--workdir {a_file} is a file, not a folder; choose a folder for --workdir (a new or "
        "an existing one)"
    )
    with pytest.raises(WorkdirNotWritableError) as raised:
        WorkdirLock(a_file / "run" / "deeper").acquire()
    assert str(raised.value) == (
        f"cannot make --workdir {a_file / 'run' / 'deeper'}: {a_file} is a file, not a folder; "
        "choose a --workdir whose parents are folders"
    )
    assert a_file.read_text() == ""


SMALL_LISTOPS = dict(min_length=8, max_length=60, num_train=4, num_val=2, num_test=2)


@pytest.mark.parametrize("errno_code", [errno.EROFS, errno.EACCES])
def test_a_cache_dir_that_cannot_be_written_names_the_key(tmp_path, monkeypatch, errno_code):
    """A read-only (or forbidden) cache_dir stopped the run with a bare OSError naming a
    subfolder (a user's review); it names config.data.cache_dir and the fix, for the prepared
    release caches and ListOps's generated set alike. (Simulated: the tests may run as root,
    whom permissions do not stop.)"""
    from hgrn_jax.data import listops, loader

    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if self.is_relative_to(tmp_path / "ro"):
            raise OSError(errno_code, os.strerror(errno_code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    expected = (
        rf"^config\.data\.cache_dir='{re.escape(str(tmp_path / 'ro'))}' cannot hold the prepared "
        rf"data \({re.escape(os.strerror(errno_code))}: .*\); set --config\.data\.cache_dir to a "
        "folder this user can write$"
    )
    with pytest.raises(ValueError, match=expected):
        loader.prepared(tmp_path / "ro", "listops", {"k": 1}, lambda folder: None)
    with pytest.raises(ValueError, match=expected):
        listops.ensure_generated(tmp_path / "ro", listops.ListOpsSpec(**SMALL_LISTOPS), 0)


def test_a_full_cache_dir_is_named_and_leaves_nothing_half_prepared(tmp_path, monkeypatch):
    """Preparing Retrieval or Pathfinder into a full cache_dir died of SIGBUS (`Fatal Python
    error: Bus error`, no message) writing a memory map, leaving its temporary folder; other
    builds gave a bare `[Errno 28]` or numpy's `36889 requested and 4032 written`. The memory
    maps' blocks are now reserved first, and a full disk is one line naming the key. (Simulated:
    a real full file system needs a mount.) A permission error on a source the build reads is
    not taken for the cache's."""
    from hgrn_jax.data import loader

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    cache = tmp_path / "cache"
    expected = (
        rf"^config\.data\.cache_dir='{re.escape(str(cache))}' is full \(No space left on device "
        r"preparing the data; [\d.]+ MiB free\): free space there, or set "
        r"--config\.data\.cache_dir to a folder with room, and run again"
    )

    def build_memmap(folder):
        loader.writable_memmap(folder / "x.npy", np.uint8, (64, 64))

    def build_short_write(folder):
        raise OSError("36889 requested and 4032 written")

    for build in (build_memmap, build_short_write):
        with pytest.raises(ValueError, match=expected):
            loader.prepared(cache, "aan", {"k": 1}, build)
        assert list(cache.iterdir()) == []  # the temporary folder removed

    # tfds's writer quotes the OSError in a RuntimeError (was a traceback); its scratch cache,
    # inside the tfds data folder, is named as that folder's key (was as cache_dir).
    def build_tfds_full(folder):
        raise RuntimeError(
            'Failed to finalize writing of split "train": [Errno 28] No space left on device'
        )

    with (
        loader.cache_shown_as(tmp_path / "tfds", "tfds_dir"),
        pytest.raises(
            ValueError,
            match=rf"^config\.data\.tfds_dir='{re.escape(str(tmp_path / 'tfds'))}' is full .*"
            r"set --config\.data\.tfds_dir to a folder with room",
        ),
    ):
        loader.prepared(cache / ".lra_retrieval-scratch-x", "aan", {"k": 3}, build_tfds_full)

    def build_unreadable_source(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "lra" / "f.tsv"))

    with pytest.raises(PermissionError, match=r"lra/f\.tsv"):
        loader.prepared(cache, "aan", {"k": 2}, build_unreadable_source)


def test_a_cache_dir_that_is_a_file_names_the_key(tmp_path):
    """config.data.cache_dir naming a file, or below one, stops naming the key, the path and
    the fix (it was a NotADirectoryError naming a subfolder of it), for the prepared release
    caches and for ListOps's generated set alike."""
    from hgrn_jax.data import listops, loader

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    built = []
    expected = (
        rf"^config\.data\.cache_dir='{re.escape(str(a_file))}' is a file, not a folder; set "
        r"--config\.data\.cache_dir to a folder \(a new or an existing one\) for the prepared data$"
    )
    with pytest.raises(ValueError, match=expected):
        loader.prepared(a_file, "listops", {"k": 1}, built.append)
    with pytest.raises(ValueError, match=expected):
        listops.ensure_generated(a_file, listops.ListOpsSpec(**SMALL_LISTOPS), 0)
    below = rf"^config\.data\.cache_dir='{re.escape(str(a_file / 'c'))}' lies in {re.escape(str(a_file))}, which is a file"
    with pytest.raises(ValueError, match=below):
        loader.prepared(a_file / "c", "listops", {"k": 1}, built.append)
    assert built == [] and a_file.read_text() == ""


# ----------------------------------------------------------------------------------------------
# Every split opened before the first step
# ----------------------------------------------------------------------------------------------


def test_an_empty_test_split_stops_before_training(tmp_path):
    with pytest.raises(ValueError, match="'test' split .* has no examples"):
        _run(_config(**{"data.num_test": 0}), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not _steps(tmp_path)


def test_out_of_vocabulary_data_stops_before_training(tmp_path):
    config = _config()
    config.model.vocab_size = 8  # the toy data's ids run to 15
    with pytest.raises(ValueError, match=r"token id 15 .* outside \[0, 8\).*vocab_size"):
        _run(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not _steps(tmp_path)


def _listops_release(folder: Path) -> Path:
    """A small ListOps release (generated rows in the release's layout) under ``folder``."""
    from hgrn_jax.data import listops

    generated = listops.ensure_generated(folder / "gen", listops.ListOpsSpec.tiny(), 0)
    release = folder / "lra" / "listops-1000"
    shutil.copytree(generated, release)
    return release


@pytest.mark.slow
def test_a_broken_test_file_stops_before_training(tmp_path):
    from experiments.configs.lra import listops as listops_config

    release = _listops_release(tmp_path)
    (release / "basic_test.tsv").write_bytes(bytes(range(256)) * 4)
    config = listops_config.get_config("tiny")
    config.unlock()
    config.data.source = "release"
    config.data.lra_dir = str(release.parent)
    config.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"basic_test\.tsv:1: binary data"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not _steps(tmp_path / "run")


def test_labels_of_a_task_of_the_user_s_own_outside_the_classes_stop_before_training(tmp_path):
    """A hand-written task (the protocol, not the package's ArrayTask, which checks its splits
    as they load) whose labels left ``[0, config.model.num_classes)`` trained without a word
    (val accuracy 3%). The first batch of each split is checked before the first step."""
    config = _config()
    config.model.num_classes = 3  # the toy task's labels run 0 to 3
    with pytest.raises(
        ValueError,
        match=r"^the first (val|test) batch: class label 3 is outside \[0, 3\) "
        r"\(config\.model\.num_classes=3\); give labels 0 to 2, or set "
        r"--config\.model\.num_classes to the data's number of classes$",
    ):
        _run(config, tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))  # no step trained


# ----------------------------------------------------------------------------------------------
# Models: token ids, empty sequences, widths
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    from hgrn_jax.nn import HGRNLM, ClassifierConfig, HGRNClassifier, LMConfig

    classifier = HGRNClassifier(
        ClassifierConfig(num_classes=3, features=8, num_layers=1, vocab_size=10, norm="layer"),
        rngs=nnx.Rngs(0),
    )
    lm = HGRNLM(LMConfig(vocab_size=16, features=8, num_layers=1), rngs=nnx.Rngs(0))
    return classifier, lm


@pytest.mark.slow
@pytest.mark.parametrize("bad", [10, 11, -1])
def test_classifier_rejects_ids_outside_the_vocabulary(models, bad):
    classifier, _ = models
    with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, 10\).*vocab_size=10"):
        classifier(jnp.array([[1, bad, 2]]))
    assert np.isfinite(np.asarray(classifier(jnp.array([[1, 9, 0]])))).all()


def test_lm_and_generate_reject_ids_outside_the_vocabulary(models):
    from hgrn_jax.nn import generate

    _, lm = models
    with pytest.raises(ValueError, match=r"token id 16 is outside \[0, 16\)"):
        lm(jnp.array([[1, 16]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside \[0, 16\)"):
        lm.step(jnp.array([[-1]]), lm.init_cache(1))
    with pytest.raises(ValueError, match=r"prompt_ids: token id 16"):
        generate(lm, jnp.array([[1, 16]]), max_new_tokens=3, rng=jax.random.key(0))


def test_checked_mode_catches_bad_ids_under_jit(models):
    from jax.experimental import checkify

    from hgrn_jax.nn import checked_token_ids

    classifier, _ = models
    graphdef, state = nnx.split(classifier)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    # Unchecked, jit cannot see the values: an id >= vocab_size gives NaN (documented).
    assert np.isnan(np.asarray(jax.jit(forward)(state, jnp.array([[1, 12, 2]])))).all()
    with checked_token_ids():
        checked = jax.jit(checkify.checkify(forward))
        error, _ = checked(state, jnp.array([[1, 12, 2]]))
    with pytest.raises(checkify.JaxRuntimeError, match=r"token id 12 is outside \[0, 10\)"):
        error.throw()
    error, logits = checked(state, jnp.array([[1, 9, 2]]))
    assert error.get() is None and np.isfinite(np.asarray(logits)).all()


def test_empty_sequences_and_wrong_widths_name_the_expected_shape(models):
    from hgrn_jax.nn import HGRU, HGRU2D

    classifier, lm = models
    with pytest.raises(ValueError, match=r"length 0; expected token ids \(batch, length\)"):
        classifier(jnp.zeros((2, 0), jnp.int32))
    with pytest.raises(ValueError, match=r"length 0; expected token ids \(batch, length\)"):
        lm(jnp.zeros((2, 0), jnp.int32))
    layer = HGRU(8, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"HGRU expects \(batch, length, d\); got shape "
        r"\(1, 4, 5\) \(this layer has d = 8",
    ):
        layer(jnp.ones((1, 4, 5)))
    with pytest.raises(ValueError, match=r"expects \(batch, length, d\); got shape \(1, 0, 8\)"):
        layer(jnp.ones((1, 0, 8)))
    grid = HGRU2D(8, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"HGRU2D expects \(batch, H, W, d\); got shape "
        r"\(1, 2, 2, 5\) \(this layer has d = 8",
    ):
        grid(jnp.ones((1, 2, 2, 5)))


def test_layers_refuse_non_float_inputs_lists_wrong_widths_and_zero_widths():
    """Found by a library user's review: integer and bool activations ran as if they were
    floats, complex ones failed deep in JAX, a list with an AttributeError, a block or GLU of
    the wrong width with a reshape or dot_general error, a width of 0 with a
    ZeroDivisionError inside Flax. Each is now one ValueError naming the layer and the fix."""
    from hgrn_jax.nn import GLU, HGRN2, HGRU, ClassifierConfig, FlaHGRNAttention
    from hgrn_jax.nn.blocks import residual_stack

    layer = HGRU(8, rngs=nnx.Rngs(0))
    for dtype in (jnp.int32, jnp.bool_, jnp.complex64):
        with pytest.raises(
            ValueError,
            match=rf"^HGRU expects real floating-point activations \(batch, length, d\); got "
            rf"{jnp.dtype(dtype).name}: embed token ids first",
        ):
            layer(jnp.ones((1, 4, 8), dtype))
    for other in (HGRN2(8, rngs=nnx.Rngs(0)), FlaHGRNAttention(8, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match=r"expects real floating-point activations"):
            other(jnp.ones((1, 4, 8), jnp.int32))
    with pytest.raises(
        ValueError, match=r"^HGRU expects an array .*; got a list: pass jnp\.asarray"
    ):
        layer([[[1.0] * 8]])
    with pytest.raises(ValueError, match=r"^GLU expects \(\.\.\., d\); got shape \(1, 4, 5\) "):
        GLU(8, 16, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 5)))
    config = ClassifierConfig(num_classes=2, features=8, num_layers=1, vocab_size=4)
    block = residual_stack(config, causal=False, rngs=nnx.Rngs(0))[0]
    with pytest.raises(
        ValueError, match=r"^ResidualBlock expects \(batch, \.\.\., d\); got shape \(1, 4, 5\) "
    ):
        block(jnp.ones((1, 4, 5)))
    assert block(jnp.ones((1, 4, 8))).shape == (1, 4, 8)
    for build in (lambda: HGRU(0, rngs=nnx.Rngs(0)), lambda: HGRN2(0, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match=r"features must be a positive integer; got 0$"):
            build()
    with pytest.raises(ValueError, match=r"^GLU: hidden must be a positive integer; got 0$"):
        GLU(8, 0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# Data readers
# ----------------------------------------------------------------------------------------------

GOOD_ROWS = "Source\tTarget\n" + "".join(f"( [MAX {i} 3 ] )\t{max(i, 3)}\n" for i in range(6))


def _release_with_train(tmp_path: Path, train: bytes) -> str:
    folder = tmp_path / "lra" / "listops-1000"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_bytes(
            train if split == "train" else GOOD_ROWS.encode()
        )
    return str(folder.parent)


def test_a_utf8_bom_in_the_header_is_ignored(tmp_path):
    from hgrn_jax.data import listops_release, text_lines

    lra_dir = _release_with_train(tmp_path, b"\xef\xbb\xbf" + GOOD_ROWS.encode())
    data = listops_release.load_split("train", lra_dir=lra_dir, seq_len=32)
    assert len(data["labels"]) == 6
    lines = list(
        text_lines.decoded_lines(
            Path(lra_dir) / "listops-1000" / "basic_train.tsv", on_undecodable=None
        )
    )
    assert lines[0].startswith("Source\t") and len(lines) == 7


def test_undecodable_bytes_name_file_and_line_and_can_be_skipped(tmp_path):
    from hgrn_jax.data import listops_release
    from hgrn_jax.data.errors import BadDataError

    lra_dir = _release_with_train(tmp_path, GOOD_ROWS.encode().replace(b"[MAX 2", b"[MAX \xff2"))
    with pytest.raises(
        BadDataError,
        match=r"(?s)basic_train\.tsv:4: not valid UTF-8.*"
        r"skip_bad_rows=True",
    ):
        listops_release.load_split("train", lra_dir=lra_dir, seq_len=32)
    with pytest.warns(UserWarning, match=r"basic_train\.tsv:4"):
        data = listops_release.load_split("train", lra_dir=lra_dir, seq_len=32, skip_bad_rows=True)
    assert len(data["labels"]) == 5


def test_a_binary_file_is_named_and_skipping_is_not_suggested(tmp_path):
    from hgrn_jax.data import listops_release

    lra_dir = _release_with_train(tmp_path, bytes(range(256)) * 8)
    for skip in (False, True):
        with pytest.raises(ValueError, match=r"basic_train\.tsv:1: binary data") as caught:
            listops_release.load_split("train", lra_dir=lra_dir, seq_len=32, skip_bad_rows=skip)
        assert "skip_bad_rows" not in str(caught.value)


def test_a_bad_header_does_not_suggest_skipping(tmp_path):
    from hgrn_jax.data import listops_release
    from hgrn_jax.data.errors import BadDataError

    lra_dir = _release_with_train(tmp_path, GOOD_ROWS.replace("Source", "Src").encode())
    for skip in (False, True):
        with pytest.raises(BadDataError, match="must name the columns") as caught:
            listops_release.load_split("train", lra_dir=lra_dir, seq_len=32, skip_bad_rows=skip)
        assert "--config.data.skip_bad_rows=True" not in str(caught.value)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_generated_data_and_caches_follow_the_umask(tmp_path, mask):
    from hgrn_jax.data import listops, loader

    previous = os.umask(mask)
    try:
        folder = listops.ensure_generated(tmp_path / "gen", listops.ListOpsSpec.tiny(), 0)
        cache = loader.prepared(
            tmp_path / "cache",
            "x",
            {"k": 1},
            lambda f: loader.save_arrays(f, "data", {"a": np.zeros(3)}),
        )
    finally:
        os.umask(previous)
    for path in [*folder.iterdir(), *cache.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert cache.stat().st_mode & 0o777 == 0o777 & ~mask


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _results(folder: Path, text: str) -> None:
    """A run folder with ``text`` as its results.json, beside a run's config.json (without
    one a run's model cannot be told, and it is left out)."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(text)
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text('{"task": "listops", "model": {}}')


def test_report_skips_broken_runs_and_reports_the_others(tmp_path, capsys):
    from experiments import report

    good = {
        "task": "listops",
        "metric": "accuracy",
        "best_val": 51.0,
        "test": 50.0,
        "steps": 40,
        "paper": 59.95,
    }
    _results(tmp_path / "a_corrupt", '{"task": "listops", "te')
    _results(tmp_path / "b_empty", "{}")
    _results(tmp_path / "c_list", "[]")
    _results(tmp_path / "d_good", json.dumps(good))
    assert report.main([str(tmp_path), "--png", str(tmp_path / "curves.png")]) == 0
    captured = capsys.readouterr()
    for name in ("a_corrupt", "b_empty", "c_list"):
        assert re.search(rf"warning: skipping .*{name}", captured.err), captured.err
        assert name not in captured.out
    assert "| ListOps | 59.95 | 50.00 | 51.00 | 40 |" in captured.out


def test_report_skips_runs_whose_fields_have_the_wrong_types(tmp_path, capsys):
    """Valid JSON that experiments.train would not write (a null parameter count, a text test
    score, a config whose data or model is not an object) stopped the whole report with a
    traceback; such a run is left out with a warning naming the file and key."""
    from experiments import report

    good = {"task": "listops", "metric": "accuracy", "best_val": 51.0, "test": 50.0, "steps": 40}
    config = {"task": "listops", "model": {}}
    broken = {
        "a_params": (dict(good, task="imagenet", num_params=None), config),
        "b_test": (dict(good, test="n/a"), config),
        "c_data": (good, dict(config, data=None)),
        "e_mixer": (good, dict(config, model={"mixer": "hgrn2"})),
    }
    # A config.json that is no run's config (no task, or a model that is not an object) is
    # left out as a missing one is: its model cannot be told.
    foreign = {"d_model": (good, dict(config, model="hgrn")), "f_empty": (good, {})}
    for name, (results, saved) in (broken | foreign).items():
        _results(tmp_path / name, json.dumps(results))
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
    _results(tmp_path / "z_good", json.dumps(dict(good, paper=59.95)))
    assert report.main([str(tmp_path), "--png", str(tmp_path / "curves.png")]) == 0
    captured = capsys.readouterr()
    for name, key in zip(broken, ("num_params", "test", "data", "model.mixer")):
        assert re.search(rf"warning: skipping .*{name}.*: {key} should be", captured.err), name
    for name in foreign:
        assert re.search(
            rf"warning: skipping .*{name}: .*{name}/config.json holds no run config \(a JSON "
            r"object with task and model\) and no checkpoint holds a copy",
            captured.err,
        ), name
    assert "| ListOps | 59.95 | 50.00 | 51.00 | 40 |" in captured.out


def test_report_with_an_unwritable_run_folder_writes_the_curves_elsewhere(tmp_path, capsys):
    from experiments import report

    good = {"task": "listops", "metric": "accuracy", "best_val": 51.0, "test": 50.0, "steps": 4}
    _results(tmp_path / "run", json.dumps(good))
    (tmp_path / "curves.png").mkdir()  # the default place cannot be written (even by root)
    assert report.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    written = re.search(r"training curves: (\S+)", captured.out).group(1)
    assert Path(written).is_file() and Path(written).parent == Path(tempfile.gettempdir())
    assert f"cannot write {tmp_path / 'curves.png'}" in captured.err
    Path(written).unlink()
    # An explicit --png that cannot be written: exit 2 naming it.
    below_a_file = tmp_path / "run" / "results.json" / "curves.png"
    assert report.main([str(tmp_path), "--png", str(below_a_file)]) == 2
    assert "cannot write --png" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Command line: every user error is exit 2 and one line
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_user_errors_are_one_line_with_exit_code_2(tmp_path, finished):
    listops_tiny = f"{LISTOPS_CONFIG}:tiny"
    release = _listops_release(tmp_path / "data")
    (release / "basic_val.tsv").write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    cases = [
        (("nope.py", tmp_path / "w1"), [r"config file nope\.py not found"]),
        ((f"{LISTOPS_CONFIG}:huge", tmp_path / "w2"), [r"unknown preset 'huge'", "tiny"]),
        (
            (listops_tiny, tmp_path / "w3", "--config.num_train_steps=0"),
            [r"config\.num_train_steps=0 must be at least 1"],
        ),
        (  # was "invalid literal for int() with base 10: 'abc'"
            (listops_tiny, tmp_path / "w5", "--config.batch_size=abc"),
            [r"--config\.batch_size=abc: --config\.batch_size must be a whole number, as the "],
        ),
        (
            (listops_tiny, a_file / "run"),
            [rf"{re.escape(str(a_file))} is a file, not a folder", "parents are folders"],
        ),
        (
            (
                listops_tiny,
                tmp_path / "w4",
                "--config.data.source=release",
                f"--config.data.lra_dir={release.parent}",
                f"--config.data.cache_dir={tmp_path}/c",
            ),
            [r"basic_val\.tsv:1: binary data"],
        ),
        (
            (TOY_CONFIG, run, "--config.model.features=64"),
            [r"model\.features: 16 -> 64", r"--config\.resume=restart"],
        ),
    ]
    before = _tree_digest(run)
    for args, patterns in cases:
        _assert_one_line_usage_error(_train(*args), *patterns)
    assert _tree_digest(run) == before
    assert not (tmp_path / "w3").exists() or not (tmp_path / "w3" / "checkpoints").exists()


@pytest.mark.parametrize(
    "source, preset, expected",
    [
        (
            "def config(preset=None):\n    return None\n",
            "",
            r"config file \S+/user\.py defines no get_config; add get_config\(preset=None\)",
        ),
        (
            "def get_config():\n    return None\n",
            ":tiny",
            r"user\.py: get_config\(\) takes 0 positional arguments but 1 was given; define "
            r"get_config\(preset=None\) so that --config=\S+user\.py:tiny can pass it the preset",
        ),
        (
            "from toy_task import toy_config\n\ndef get_config(preset=None):\n"
            "    c = toy_config()\n    c.lock()\n    c.model.featurs = 8\n    return c\n",
            "",
            r"user\.py, line 6: AttributeError: Key \"featurs\" does not exist and cannot be "
            r"added since the config is locked\.; Did you mean "
            r"\"features\".*; fix the file",
        ),
        ("def get_config(preset=None)\n    return None\n", "", r"user\.py, line 1: SyntaxError"),
        ("import no_such_module\n", "", r"line 1: ModuleNotFoundError: No module named 'no_such"),
        (None, "", r"config file \S+/user\.py not found \(--config=\S+/user\.py\); pass --config"),
    ],
)
def test_a_config_file_s_own_errors_are_one_line_naming_the_file(
    tmp_path, source, preset, expected
):
    """A config file without get_config was reported as 'unknown config key --config.?', an
    error inside it as an unknown key too; a syntax or import error in it, or a missing file
    with any --config.key override, was a traceback with exit code 1 (the NaN code)."""
    path = tmp_path / "user.py"
    if source is not None:
        path.write_text(source)
    proc = _train(f"{path}{preset}", tmp_path / "run", "--config.batch_size=8")
    _assert_one_line_usage_error(proc, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "def get_config(preset=None):\n    return {'task': 'listops'}\n",
            r"config file \S+/user\.py: get_config returned a dict, not an "
            r"ml_collections\.ConfigDict; return one \(start from a shipped config",
        ),
        (
            "import ml_collections\n\ndef get_config(preset=None):\n"
            "    return ml_collections.ConfigDict(dict(task='listops', batch_size=8))\n",
            r"config file \S+/user\.py: the config has no 'data', 'model', 'num_train_steps'; a "
            r"run needs task, data, model, batch_size, num_train_steps \(start from a shipped",
        ),
        (  # absl: "Flag --config must have a value other than None" (said "is required" too)
            "def get_config(preset=None):\n    config = None\n",
            r"config file \S+/user\.py: get_config returned None \(no `return config` at its end",
        ),
        (
            "from toy_task import toy_config\n\ndef get_config(preset=None):\n"
            "    c = toy_config()\n    c.lock()\n    c.data.num_symbols = 4\n    return c\n",
            r"user\.py, line 6: AttributeError: Key \"num_symbols\" does not exist and cannot be "
            r"added since the config is locked\..* Add new keys inside `with config\.unlocked\(\):`",
        ),
    ],
)
def test_a_config_that_is_no_run_config_is_one_line_naming_the_file(tmp_path, source, expected):
    """A get_config returning a dict ("AttributeError: 'dict' object has no attribute
    'task'"), a config without a data section (AttributeError: "'data'") and a new key in a
    locked preset (no word of config.unlocked(), the fix docs/tasks.md gives)."""
    path = tmp_path / "user.py"
    path.write_text(source)
    proc = _train(path, tmp_path / "run")
    _assert_one_line_usage_error(proc, expected)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------


TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error writing "params.w/.zarray" in OCDBT '
    'database at local file "{run}/checkpoints/9.orbax-checkpoint-tmp/state/": Failed writing: '
    '"{run}/checkpoints/9.orbax-checkpoint-tmp/state/d/89d1": Failed to write 200 bytes to '
    "file 19: No space left on device [os_error_code='28'] [tensorstore_spec='{{}}']"
)
"""TensorStore's error on a full disk, as a 1.1 MB tmpfs gave it (shortened)."""


@pytest.mark.parametrize("raised_by", ["python", "tensorstore"])
def test_a_full_disk_stops_the_run_naming_the_last_checkpoint_and_a_rerun_resumes(
    tmp_path, finished, monkeypatch, raised_by
):
    """The save of step 9 fails for lack of space, as Orbax's writes do on a full disk (seen on
    a 1.1 MB tmpfs, either as Python's ``OSError: [Errno 28] No space left on device`` with no
    file named, or as TensorStore's ValueError). The run stops with one line naming the
    workdir, the last complete checkpoint and what to do; checkpoints 3 and 6 stay, and the
    rerun ends where an undisturbed run does."""
    from hgrn_jax.training.checkpoint import Checkpoints
    from hgrn_jax.training.workdir import WorkdirFullError

    real_save = Checkpoints.save

    def save(self, step, *args, **kwargs):
        if step == 9 and raised_by == "python":
            raise OSError(errno.ENOSPC, "No space left on device")
        if step == 9:
            raise ValueError(TENSORSTORE_FULL.format(run=run))
        return real_save(self, step, *args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Checkpoints, "save", save)
        with pytest.raises(WorkdirFullError) as raised:
            _run(_config(), run)
    message = str(raised.value)
    writing = ""
    if raised_by == "tensorstore":
        writing = re.escape(f" writing {run}/checkpoints/9.orbax-checkpoint-tmp/state/d/89d1")
    assert re.fullmatch(
        rf"No space left on device on the file system of {re.escape(str(run))}"
        rf"{writing} \(\d+\.\d MiB free\): the run stopped; its checkpoints are kept, the last complete "
        r"one at step 6 \(\d+\.\d MiB; config.keep_checkpoints=3 of them are kept, plus the one "
        r"being written\); free space \(or inodes: delete files\) there, then run the same command "
        r"again to resume",
        message,
    ), message
    assert _steps(run) == [3, 6] and not (run / "run.lock").exists()
    results = _run(_config(), run)
    assert results["test"] == finished[1]["test"] and results["steps"] == 12


def test_a_file_system_out_of_inodes_is_named_as_such(monkeypatch, tmp_path):
    """Out of inodes, writes fail with "No space left on device" while megabytes are free: the
    message said "(62.4 MiB free)" and nothing else (seen on a tmpfs with nr_inodes=400, the
    run stopping at its 11th checkpoint). It now says that no new file can be made."""
    from hgrn_jax.data import disk_space

    def statvfs(files, favail):
        return lambda path: os.statvfs_result(
            (4096, 4096, 16384, 16000, 16000, files, 0, favail, 0, 255)
        )

    monkeypatch.setattr(disk_space.os, "statvfs", statvfs(400, 0))
    assert disk_space.describe_free_space(tmp_path) == (
        "62.5 MiB free, but 0 of 400 inodes: no new file can be made"
    )
    monkeypatch.setattr(disk_space.os, "statvfs", statvfs(400, 3))
    assert disk_space.describe_free_space(tmp_path) == "62.5 MiB free"
    monkeypatch.setattr(disk_space.os, "statvfs", statvfs(0, 0))  # btrfs: no inode count
    assert disk_space.describe_free_space(tmp_path) == "62.5 MiB free"


_SAVE_FOLDER_FULL = """
import errno, os, runpy, sys
real_makedirs = os.makedirs

def makedirs(path, *args, **kwargs):  # the file system runs out of inodes at step 6's save
    if "6.orbax-checkpoint-tmp" in str(path) and str(path).endswith("config.orbax-checkpoint-tmp"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_makedirs(path, *args, **kwargs)

os.makedirs = makedirs
sys.argv = ["experiments.train", *sys.argv[1:]]
runpy.run_module("experiments.train", run_name="__main__")
"""


@pytest.mark.slow  # end-to-end: a training run in a subprocess
def test_a_save_whose_folder_cannot_be_made_does_not_hang_the_exit(tmp_path):
    """Out of inodes (a tmpfs with nr_inodes=40), a save failed making its item folder: the
    run printed its one-line error, then Python waited 300 s at exit for Orbax's threads,
    which wait that long for the folder (5 min 13 s in all). It now exits with status 2 once
    the error is out, the exit handlers run, the checkpoints kept."""
    run = tmp_path / "run"
    command = [sys.executable, "-c", _SAVE_FOLDER_FULL, f"--config={REPO}/tests/toy_task.py"]
    command += [f"--workdir={run}"]
    done = subprocess.run(
        command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=200
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: WorkdirFullError: No space left on device on the file system of {run} writing "
        f"{run}/checkpoints/6.orbax-checkpoint-tmp/config.orbax-checkpoint-tmp ("
    ), last
    # Orbax's logs of the same failure (209 lines, 3 tracebacks, before the one line) are left
    # out: quiet_echoes_of_a_full_disk.
    assert "Traceback" not in done.stderr and "orbax" not in done.stderr.replace(last, ""), (
        done.stderr[-3000:]
    )
    assert _steps(run) == [3]
    # With --traceback (what every one-line error suggests) the error is raised, not reported:
    # that path hung as long.
    done = subprocess.run(
        [*command, "--traceback"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" in done.stderr and "WorkdirFullError" in done.stderr


def _record(logger: str, level: int, message: str, pathname: str, error=None):
    exc_info = (type(error), error, error.__traceback__) if error else None
    return logging.getLogger(logger).makeRecord(logger, level, pathname, 1, message, (), exc_info)


def _raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise error from cause
    except BaseException as caught:
        return caught


ORBAX_FILE = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"


@pytest.mark.parametrize(
    "logger, level, message, pathname, error, dropped",
    [
        # Orbax's threads log a save that failed for lack of space, each with its traceback
        (
            "absl",
            logging.ERROR,
            "_SignalingThread.run() raised",
            ORBAX_FILE,
            _raised(ValueError(TENSORSTORE_FULL.format(run="/r"))),
            True,
        ),
        (
            "absl",
            logging.ERROR,
            "Failed to run 6 Handler Commit operations",
            ORBAX_FILE,
            _raised(
                RuntimeError("commit failed"), OSError(errno.ENOSPC, "No space left on device")
            ),
            True,
        ),
        ("absl", logging.ERROR, "Error writing: No space left on device", ORBAX_FILE, None, True),
        # asyncio: an Orbax write's future, its exception never retrieved
        (
            "asyncio",
            logging.ERROR,
            "_GatheringFuture exception was never retrieved",
            "/python/asyncio/base_events.py",
            _raised(ValueError(TENSORSTORE_FULL.format(run="/r"))),
            True,
        ),
        # kept: Orbax's other errors, its warnings, anyone else's errors
        (
            "absl",
            logging.ERROR,
            "_SignalingThread.run() raised",
            ORBAX_FILE,
            _raised(ValueError("RESOURCE_EXHAUSTED: out of memory")),
            False,
        ),
        ("absl", logging.WARNING, "No space left on device", ORBAX_FILE, None, False),
        ("absl", logging.ERROR, "No space left on device", "/work/my_code.py", None, False),
        (
            "asyncio",
            logging.ERROR,
            "Task exception was never retrieved",
            "/python/asyncio/base_events.py",
            _raised(KeyError("k")),
            False,
        ),
    ],
)
def test_the_runner_leaves_out_orbax_echoes_of_a_full_disk_and_nothing_else(
    logger, level, message, pathname, error, dropped
):
    """On a 2 MB tmpfs filled at a save, the run printed 1,079 lines (Orbax's error logs of the
    failure from each thread, with tracebacks; asyncio's unretrieved futures; ``Event loop is
    closed``) around its one-line error. The runner's filter drops those records only."""
    from hgrn_jax.training.checkpoint import _is_echo_of_a_full_disk

    record = _record(logger, level, message, pathname, error)
    assert _is_echo_of_a_full_disk(record) is dropped


@pytest.mark.parametrize("full_disk", [True, False], ids=["full_disk", "no_full_disk"])
def test_the_runner_leaves_out_event_loop_is_closed_only_after_a_full_disk(monkeypatch, full_disk):
    """A write finishing after the failed save's event loop closed raised ``RuntimeError: Event
    loop is closed`` in asyncio's ``call_soon_threadsafe`` as an unraisable exception (57 such
    tracebacks on the full tmpfs, before Orbax's logs of the failure). They are held: left out
    once an echo of a full disk was seen, shown at exit otherwise. Any other unraisable
    exception is shown at once."""
    import asyncio
    import atexit

    from hgrn_jax.training import checkpoint

    shown, at_exit = [], []
    monkeypatch.setattr(sys, "unraisablehook", shown.append)
    monkeypatch.setattr(atexit, "register", at_exit.append)
    monkeypatch.setattr(logging.getLogger("absl"), "filters", [])
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    checkpoint.quiet_echoes_of_a_full_disk()
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as closed:
        late_write = closed
    other = _raised(RuntimeError("Event loop is closed"))  # not asyncio's: shown
    value_error = _raised(ValueError("x"))

    def unraisable(error):
        return types.SimpleNamespace(
            exc_type=type(error),
            exc_value=error,
            exc_traceback=error.__traceback__,
            err_msg=None,
            object=None,
        )

    for error in (late_write, other, value_error):
        sys.unraisablehook(unraisable(error))
    assert [u.exc_value for u in shown] == [other, value_error]
    absl = logging.getLogger("absl")
    assert absl.filter(_record("absl", logging.ERROR, "x", ORBAX_FILE))
    if full_disk:
        assert not absl.filter(
            _record("absl", logging.ERROR, "No space left on device", ORBAX_FILE)
        )
    (at_exit_handler,) = at_exit
    at_exit_handler()
    expected = [other, value_error] + ([] if full_disk else [late_write])
    assert [u.exc_value for u in shown] == expected


_EXIT_WITH = """
import atexit, concurrent.futures, sys, threading, time
from experiments import cli

atexit.register(lambda: print("exit handlers ran", flush=True))
pool = concurrent.futures.ThreadPoolExecutor(2)
pool.submit(lambda: 0).result()  # an idle pool worker: the interpreter's exit stops it
if sys.argv[1] == "stuck":
    threading.Thread(target=time.sleep, args=(600,)).start()  # as a failed save's
cli.exit_past_stuck_threads(3, grace_s=0.5)
print("returned", flush=True)
"""


@pytest.mark.parametrize("threads", ["stuck", "idle pool"])
def test_the_exit_after_a_failure_waits_for_no_stuck_thread(threads):
    """A thread stuck 10 minutes: exit 3 once the grace is over, the exit handlers run. An
    idle thread pool's workers alone (the ImageNet decoders') are no reason to cut the exit
    short: it returns, and the interpreter ends them as usual."""
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WITH, threads],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if threads == "stuck":
        assert (done.returncode, done.stdout) == (3, "exit handlers ran\n"), done.stderr
    else:
        assert (done.returncode, done.stdout) == (0, "returned\nexit handlers ran\n"), done.stderr


def test_device_and_process_variables_are_whole_numbers():
    from hgrn_jax.sharding import env_whole_number

    assert env_whole_number("N", 1, {}) is None and env_whole_number("N", 1, {"N": " "}) is None
    assert env_whole_number("N", 0, {"N": "0"}) == 0 and env_whole_number("N", 1, {"N": "8"}) == 8
    for text, minimum in (("abc", 1), ("0", 1), ("-2", 1), ("two", 1), ("x", 0), ("1.5", 0)):
        with pytest.raises(ValueError, match=rf"^N='{re.escape(text)}' must be a whole number >= "):
            env_whole_number("N", minimum, {"N": text})


@pytest.mark.parametrize(
    "variable, value, minimum",
    [("HGRN_NUM_CPU_DEVICES", "0", 1), ("JAX_NUM_PROCESSES", "two", 1)],
)
def test_a_malformed_device_or_process_variable_is_one_line(tmp_path, variable, value, minimum):
    """These gave an XLA error about process indices (0) or an int() traceback (two; also
    JAX_PROCESS_ID=x), and HGRN_NUM_CPU_DEVICES=-2 was taken; now one line naming the
    variable, exit 2, nothing made (the rule itself: the test above)."""
    command = [sys.executable, "-m", "experiments.train", f"--config={TOY_CONFIG}"]
    command += [f"--workdir={tmp_path / 'run'}"]
    env = dict(cli_env(), **{variable: value})
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    _assert_one_line_usage_error(
        proc, rf"^error: (process \S+: )?{variable}='{value}' must be a whole number >= {minimum}"
    )
    assert not (tmp_path / "run").exists()


def test_a_damaged_checkpoint_behind_a_link_to_another_file_system_is_set_aside_there(
    tmp_path, monkeypatch
):
    """checkpoints/ a link to another file system (a larger disk): moving a damaged checkpoint
    to checkpoints.damaged/ beside the link failed with EXDEV ("Invalid cross-device link"), and
    every rerun stopped there instead of falling back. It goes to checkpoints/damaged/ then, on
    the checkpoints' own file system, which Orbax does not take for a step. (The two file
    systems are simulated: st_dev of the link differs from its parent's.)"""
    from hgrn_jax.training import checkpoint as checkpoint_module
    from hgrn_jax.training.checkpoint import CheckpointFallbackWarning, Checkpoints
    from hgrn_jax.training.workdir import has_checkpoint

    elsewhere = tmp_path / "big_disk" / "ckpts"
    run = tmp_path / "run"
    run.mkdir()
    elsewhere.mkdir(parents=True)
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    tree = {"w": jnp.arange(100_000.0)}
    earlier = Checkpoints(run / "checkpoints", keep=3, async_save=False)
    earlier.save(1, tree, {"step": 1})
    earlier.save(2, jax.tree.map(lambda x: 2 * x, tree), {"step": 2})
    earlier.close()
    data = max(
        (elsewhere / "2" / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size
    )
    data.write_bytes(data.read_bytes()[:1000])

    real_device = checkpoint_module._device
    monkeypatch.setattr(
        checkpoint_module,
        "_device",
        lambda path: real_device(path) + (Path(path) == run / "checkpoints"),
    )
    checkpoints = Checkpoints(run / "checkpoints", keep=3)
    with pytest.warns(CheckpointFallbackWarning, match=r"moved it to .*checkpoints/damaged/2"):
        step, _, _ = checkpoints.restore_latest(jax.eval_shape(lambda: tree))
    checkpoints.close()
    assert step == 1 and (elsewhere / "damaged" / "2" / "state").is_dir()
    assert not (run / "checkpoints.damaged").exists()
    assert Checkpoints(run / "checkpoints").all_steps() == [1]  # "damaged" is no step
    shutil.rmtree(elsewhere / "1")
    assert has_checkpoint(run)  # the damaged one still marks a run that checkpointed


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard_link", "no_hard_links"])
def test_a_full_disk_while_locking_leaves_no_file_and_says_it_is_full(
    tmp_path, monkeypatch, hard_links
):
    """A resumed run on a full disk stopped with "cannot write to W (No space left on device);
    ... fix its permissions", and left an empty lock record (run.lock.HOST.PID.tmp); on a file
    system without hard links an empty run.lock, which names no holder and stops every later
    run. The message now says the file system is full, and nothing is left."""
    import errno as errno_module

    from hgrn_jax.training import workdir as workdir_module
    from hgrn_jax.training.workdir import WorkdirLock, WorkdirNotWritableError

    synced = []

    def fsync(fd):  # without hard links the record is written, then the lock fails
        synced.append(fd)
        if hard_links or len(synced) > 1:
            raise OSError(errno_module.ENOSPC, "No space left on device")

    def no_link(source, target):
        raise OSError(errno_module.EPERM, "Operation not permitted")

    monkeypatch.setattr(workdir_module.os, "fsync", fsync)
    if not hard_links:
        monkeypatch.setattr(workdir_module.os, "link", no_link)
    with pytest.raises(
        WorkdirNotWritableError,
        match=rf"^cannot write to {tmp_path}: its file system is full \(.* MiB free.*\); nothing "
        r"was changed\. Free space there and run again, or choose another --workdir$",
    ):
        WorkdirLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []
