"""The input pipeline's state in the checkpoint: saved per process, covered by the checksums,
restored on resume (the same final parameters as an uninterrupted run), and checkpoints of older
code without it still resume (at their step, with a warning).

Runs LRA Image's tiny preset (generated 8 x 8 images, a new epoch at step 5) for 6 steps on the 8
simulated devices, checkpointing at steps 3 and 6.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_fixtures import tiny_config

from hgrn_jax.data import grain_pipeline
from hgrn_jax.training import integrity
from hgrn_jax.training.loop import InputStateWarning, train_and_evaluate

STEPS = 6


def config():
    c = tiny_config("lra.image", train_examples=40, val_examples=16, test_examples=16)
    c.model.num_layers = 1
    c.model.features = 16
    c.batch_size = c.eval_batch_size = 8  # 5 steps per epoch: step 5 starts a new epoch
    c.num_train_steps = STEPS
    c.eval_every = STEPS
    c.checkpoint_every = 3
    c.log_every = 3
    return c


def params(workdir: Path, step: int = STEPS) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_and_evaluate(config(), workdir)
    return workdir


def interrupted_at_3(reference: Path, tmp_path: Path) -> Path:
    """The reference run as if it had stopped right after its checkpoint at step 3."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / str(STEPS))
    (run / "results.json").unlink()
    return run


@pytest.mark.slow  # two short end-to-end runs (compilation included): about 30 s on 2 cores
def test_resume_restores_the_saved_input_state_and_reaches_the_same_params(
    uninterrupted, tmp_path, monkeypatch
):
    saved = uninterrupted / "checkpoints" / "3" / "input" / "process_0-of-1.json"
    state = json.loads(saved.read_text())
    assert state["next_step"] == 3 and "grain" in state and "seed 0" in state["pipeline"]
    manifest = json.loads((saved.parents[1] / integrity.MANIFEST).read_text())["files"]
    assert "input/process_0-of-1.json" in manifest  # covered by the SHA-256 manifest

    restored = []
    original = grain_pipeline.TrainIterator.set_state
    monkeypatch.setattr(
        grain_pipeline.TrainIterator,
        "set_state",
        lambda self, s: (restored.append(s["next_step"]), original(self, s))[1],
    )
    run = interrupted_at_3(uninterrupted, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputStateWarning)
        train_and_evaluate(config(), run)
    assert restored == [3]
    for a, b in zip(params(uninterrupted), params(run), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # one short end-to-end run: about 20 s on 2 cores
def test_a_checkpoint_without_input_state_resumes_at_its_step_with_a_warning(
    uninterrupted, tmp_path
):
    run = interrupted_at_3(uninterrupted, tmp_path)
    folder = run / "checkpoints" / "3"
    shutil.rmtree(folder / "input")  # as written before the input state was saved
    integrity.write_manifest(folder)
    with pytest.warns(InputStateWarning, match="step 3 holds no input-pipeline state"):
        train_and_evaluate(config(), run)
    for a, b in zip(params(uninterrupted), params(run), strict=True):
        np.testing.assert_array_equal(a, b)
