"""The HGRN2 LRA rows that our mixers support, built on the HGRN rows' data.

ListOps, Text and Retrieval use the 1-D ``hgrn2_1d`` (our bidirectional :class:`HGRN2`), Image and
Pathfinder the 2-D ``hgrn2_2d`` with ``use_series=False`` (hgru2-pytorch's ``Hgru2_2d_parallel``,
our :class:`HGRN2D`). Path-X runs ``use_series=True`` (``Hgru2_2d_series``), which we do not
have: no Path-X config.

Each ``get_config`` starts from the HGRN config of the same task (its data source, sequence
length, vocabulary and encoder stay) and applies the HGRN2 run's model and optimisation settings
from [run_lra] (see :mod:`experiments.configs.hgrn2`).
"""

from __future__ import annotations

import importlib
from typing import Any

from experiments.configs import common

# [run_lra] per task: total batch, d_model, n_layers, norm, lr, wd, dropout, warmup, training
# steps (the cosine schedule's length), GLU expand, HGRN2 expand ratio (head width), epochs,
# encoder, gradient clip; and [lra_fig] the paper's accuracy.
SETTINGS: dict[str, dict[str, Any]] = {
    "listops": dict(
        batch_size=128,
        features=64,
        num_layers=5,
        norm="sync_batch",
        learning_rate=5e-4,
        weight_decay=0.0,
        dropout=0.0,
        warmup_steps=5_000,
        decay_steps=50_000,
        glu_expand=1,
        expand_ratio=4,
        epochs=50,
        position_encoding=True,
        grad_clip_norm=0.0,
        paper_accuracy=60.52,
    ),
    "text": dict(
        batch_size=64,
        features=128,
        num_layers=4,
        norm="layer",
        learning_rate=5e-3,
        weight_decay=0.0,
        dropout=0.1,
        warmup_steps=10_000,
        decay_steps=50_000,
        glu_expand=1,
        expand_ratio=8,
        epochs=40,
        position_encoding=False,
        grad_clip_norm=0.0,
        paper_accuracy=88.97,
    ),
    "retrieval": dict(
        batch_size=128,
        features=256,
        num_layers=2,
        norm="sync_batch",
        learning_rate=5e-3,
        weight_decay=0.0,
        dropout=0.0,
        warmup_steps=312,
        decay_steps=50_000,
        glu_expand=2,
        expand_ratio=2,
        epochs=20,
        position_encoding=True,
        grad_clip_norm=1.0,
        paper_accuracy=95.07,
    ),
    # "cifar"; its training_epochs entry is 75 with a commented-out 100.
    "image": dict(
        batch_size=64,
        features=512,
        num_layers=6,
        norm="sync_batch",
        learning_rate=3e-3,
        weight_decay=0.0,
        dropout=0.0,
        warmup_steps=30_000,
        decay_steps=50_000,
        glu_expand=1,
        expand_ratio=2,
        epochs=75,
        position_encoding=True,
        grad_clip_norm=0.0,
        paper_accuracy=89.33,
    ),
    "pathfinder": dict(
        batch_size=128,
        features=128,
        num_layers=6,
        norm="batch",
        learning_rate=2e-3,
        weight_decay=0.0,
        dropout=0.0,
        warmup_steps=50_000,
        decay_steps=500_000,
        glu_expand=1,
        expand_ratio=2,
        epochs=100,
        position_encoding=False,
        grad_clip_norm=0.0,
        paper_accuracy=93.95,
    ),
}


def hgrn2_lra_config(task: str, preset: str | None, path: str):
    """The HGRN2 row of ``task``; ``preset="tiny"`` is the HGRN tiny run with an HGRN2 mixer."""
    hgrn = importlib.import_module(f"experiments.configs.lra.{task}")
    s = SETTINGS[task]
    if preset not in (None, ""):
        if preset != "tiny":
            raise ValueError(
                f"unknown preset {preset!r} for {path}; choose one of: tiny "
                f"(or none for the paper's setting, e.g. --config={path})"
            )
        c = hgrn.get_config("tiny")
        # Heads of width 4 at the tiny width; the rest of the tiny run is the HGRN one.
        common.use_hgrn2(c, expand_ratio=4)
        return c
    c = hgrn.get_config(None)
    common.use_hgrn2(c, expand_ratio=s["expand_ratio"])
    m = c.model
    m.features, m.num_layers, m.norm = s["features"], s["num_layers"], s["norm"]
    m.glu_expand, m.dropout = s["glu_expand"], s["dropout"]
    m.position_encoding = s["position_encoding"]
    c.batch_size = s["batch_size"]
    c.epochs = s["epochs"]
    steps_per_epoch = common.LRA_TRAIN_EXAMPLES[task] // c.batch_size
    c.num_train_steps = c.epochs * steps_per_epoch
    c.eval_every = steps_per_epoch
    c.checkpoint_every = min(steps_per_epoch, 1000)
    c.optimizer.learning_rate = s["learning_rate"]
    c.optimizer.weight_decay = s["weight_decay"]
    c.optimizer.grad_clip_norm = s["grad_clip_norm"]
    c.schedule.warmup_steps = s["warmup_steps"]
    c.schedule.decay_steps = s["decay_steps"]
    c.dtype = "bfloat16"  # [run_lra] script_lra_others.sh: trainer.precision=bf16
    c.paper.value = s["paper_accuracy"]
    return c
