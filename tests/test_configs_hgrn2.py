"""The HGRN2 experiment configs against their sources (experiments/configs/hgrn2/__init__.py).

The table below is transcribed from OpenNLPLab/HGRN2 ``run_lra.py`` (b154c396) and the paper's LRA
table (the repo's figures/lra.png), independently of the config files.
"""

from __future__ import annotations

import importlib

import data_fixtures as fx
import jax
import numpy as np
import pytest
from flax import nnx

from hgrn_jax import tasks
from hgrn_jax.nn import HGRN2, HGRN2D, HGRN2DSeries

# task: batch, d, layers, norm, lr, wd, dropout, warmup, schedule steps, GLU, expand, epochs,
#       positions, clip, accuracy
RUN_LRA = {
    "listops": (128, 64, 5, "sync_batch", 5e-4, 0, 0, 5000, 50000, 1, 4, 50, True, 0, 60.52),
    "text": (64, 128, 4, "layer", 5e-3, 0, 0.1, 10000, 50000, 1, 8, 40, False, 0, 88.97),
    "retrieval": (128, 256, 2, "sync_batch", 5e-3, 0, 0, 312, 50000, 2, 2, 20, True, 1, 95.07),
    "image": (64, 512, 6, "sync_batch", 3e-3, 0, 0, 30000, 50000, 1, 2, 75, True, 0, 89.33),
    "pathfinder": (128, 128, 6, "batch", 2e-3, 0, 0, 50000, 500000, 1, 2, 100, False, 0, 93.95),
    "pathx": (256, 32, 6, "batch", 7.5e-4, 0, 0, 150000, 500000, 1, 1, 200, True, 1, 98.12),
}
TRAIN_SIZES = {
    "listops": 96_000,
    "text": 25_000,
    "retrieval": 147_086,
    "image": 45_000,
    "pathfinder": 160_000,
    "pathx": 160_000,
}
# run_lra's use_series_dict: True for Path-X only (Hgru2_2d_series).
SCANS = {"image": "2d", "pathfinder": "2d", "pathx": "2d_series"}
LAYERS = {"1d": HGRN2, "2d": HGRN2D, "2d_series": HGRN2DSeries}


def load(name: str, preset: str | None = None):
    return importlib.import_module(f"experiments.configs.hgrn2.{name}").get_config(preset)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(RUN_LRA))
def test_hgrn2_lra_configs_follow_run_lra(task):
    (
        batch,
        d,
        layers,
        norm,
        lr,
        wd,
        dropout,
        warmup,
        steps,
        glu,
        expand,
        epochs,
        positions,
        clip,
        accuracy,
    ) = RUN_LRA[task]
    c = load(task)
    hgrn = importlib.import_module(f"experiments.configs.lra.{task}").get_config()
    m = c.model
    assert c.task == task and c.data.to_dict() == hgrn.data.to_dict()  # the HGRN row's data
    scan = SCANS.get(task, "1d")
    assert (m.mixer.kind, m.mixer.layout, m.mixer.scan, m.mixer.expand_ratio) == (
        "hgrn2",
        "official",
        scan,
        expand,
    )
    assert (m.features, m.num_layers, m.norm, m.glu_expand, m.dropout) == (
        d,
        layers,
        norm,
        glu,
        dropout,
    )
    assert m.position_encoding is positions and m.use_lower_bound is True
    # run_lra's unsynchronised "batch" norm normalised each of its 8 GPUs' 16 (Path-X: 32) examples
    assert m.batch_norm_groups == (8 if norm == "batch" else 1)
    assert (c.batch_size, c.epochs) == (batch, epochs)
    assert c.num_train_steps == epochs * (TRAIN_SIZES[task] // batch)
    assert c.optimizer.learning_rate == pytest.approx(lr)
    assert c.optimizer.weight_decay == wd and c.optimizer.grad_clip_norm == clip
    assert (c.schedule.name, c.schedule.warmup_steps, c.schedule.decay_steps) == (
        "cosine",
        warmup,
        steps,
    )
    assert c.dtype == "bfloat16" and c.paper.value == pytest.approx(accuracy)
    model = nnx.eval_shape(lambda: tasks.build_model(c, nnx.Rngs(0)))
    if norm == "batch":
        assert {model.final_norm.groups, model.blocks[0].norm1.groups} == {8}
    mixer = model.blocks[0].mixer
    assert type(mixer) is LAYERS[scan] and mixer.bidirectional
    assert (mixer.num_heads, mixer.key_dim) == (d // expand, expand)


def test_hgrn2_wikitext103_config_follows_script_lm():
    c = load("wikitext103")
    m = c.model
    assert (m.mixer.kind, m.mixer.expand_ratio, m.num_layers, m.features) == ("hgrn2", 128, 6, 512)
    assert m.tie_embeddings and m.dropout == 0.1
    assert c.batch_size * c.data.seq_len == 128 * 512 and c.num_train_steps == 50_000
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.learning_rate) == (0.9, 0.98, 5e-4)
    assert (c.optimizer.weight_decay, c.optimizer.grad_clip_norm) == (0.1, 1.0)
    assert (c.schedule.name, c.schedule.warmup_steps) == ("inverse_sqrt", 4_000)
    model = nnx.eval_shape(lambda: tasks.build_model(c, nnx.Rngs(0)))
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, HGRN2) and not mixer.bidirectional and mixer.num_heads == 4


@pytest.mark.parametrize(
    "name", ["listops", "text", "retrieval", "image", "pathfinder", "pathx", "wikitext103"]
)
def test_hgrn2_tiny_presets_build_small_hgrn2_models(name):
    tiny = load(name, "tiny")
    # Structure and size from shapes, without initialising weights (the ListOps and WikiText-103
    # tiny models are built and trained below; the mixers' own tests initialise HGRN2 layers).
    model = nnx.eval_shape(lambda: tasks.build_model(tiny, nnx.Rngs(0)))
    layer = LAYERS[SCANS.get(name, "1d")]
    assert all(type(block.mixer) is layer for block in model.blocks)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(int(np.prod(p.shape)) for p in params) < 200_000
    assert tiny.data.source in ("generated", "synthetic")
    assert tiny.num_train_steps <= 300 and tiny.batch_size <= 64
    assert tasks.get_task(tiny).name == tiny.task
    # results.json records the paper's number of the config: HGRN2's, not the HGRN tiny run's.
    assert tiny.paper.value == pytest.approx(RUN_LRA[name][-1] if name in RUN_LRA else 0.0)
    with pytest.raises(ValueError, match=r"unknown preset 'huge' for experiments/configs/hgrn2/"):
        load(name, "huge")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["listops", "pathx", "wikitext103"])
def test_hgrn2_tiny_trains_end_to_end(tmp_path, name):
    config = load(name, "tiny")
    config.data.cache_dir = str(tmp_path / "cache")
    if name != "wikitext103":  # 4 steps of 8 read 32 examples; the presets make 2,000 or 4,000
        config.data.train_examples, config.data.val_examples, config.data.test_examples = 64, 16, 16
    written = fx.train_briefly(config, tmp_path / "run", steps=4)
    assert np.isfinite(written["test_loss"])
    # HGRN2's paper numbers (Path-X: Hgru2_2d_series); the LM's is not known.
    assert written["paper"] == {"listops": 60.52, "pathx": 98.12}.get(name)
