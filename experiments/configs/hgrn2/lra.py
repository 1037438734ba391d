"""The six HGRN2 LRA rows, built on the HGRN rows' data.

ListOps, Text and Retrieval use the 1-D ``hgrn2_1d`` (our bidirectional :class:`HGRN2`), Image and
Pathfinder the 2-D ``hgrn2_2d`` with ``use_series=False`` (hgru2-pytorch's ``Hgru2_2d_parallel``,
our :class:`HGRN2D`, ``mixer.scan="2d"``), Path-X the 2-D ``hgrn2_2d`` with ``use_series=True``
(``Hgru2_2d_series``, our :class:`HGRN2DSeries`, ``mixer.scan="2d_series"``: the bidirectional
layer along H, then again along W on its output).

Each ``get_config`` starts from the HGRN config of the same task (its data source, sequence
length, vocabulary and encoder stay) and applies the HGRN2 run's model and optimisation settings
from [run_lra] (see :mod:`experiments.configs.hgrn2`).
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from experiments.configs import common
from experiments.configs.hgrn2.variants import hgrn2_variant

# [run_lra] per task, one column each: total batch, d_model, n_layers, norm, lr, wd, dropout,
# warmup, training steps (the cosine schedule's length), GLU expand, HGRN2 expand ratio (head
# width), epochs, encoder ("position": sinusoidal positions), gradient clip. Image is run_lra's
# "cifar"; its training_epochs entry is 75 with a commented-out 100. Path-X is "pathfinderx"
# (batches 256, d_model_dict 32, n_layers_dict 6, norm_dict "batch", lr_dict [0.00075],
# wd_dict 0, dropout_dict 0, warmup_steps_dict [150000], training_steps_dict 500000,
# expand_ratio_glu_dict 1, expand_ratio_dict 1, training_epochs_dict 200, encoder_dict
# "position", gradient_clip_dict 1); prenorm_dict and use_lower_bound_dict are True for every task,
# as our models are. Path-X's 200 epochs of 160,000 // 256 = 625 steps (125,000) end within its
# 150,000 warmup steps, so its learning rate peaks at 5/6 of 0.00075, as run_lra's would (the run
# starts with a RunLengthWarning saying so).
COLUMNS = (
    "batch_size",
    "features",
    "num_layers",
    "norm",
    "learning_rate",
    "weight_decay",
    "dropout",
    "warmup_steps",
    "decay_steps",
    "glu_expand",
    "expand_ratio",
    "epochs",
    "position_encoding",
    "grad_clip_norm",
)
# fmt: off
RUN_LRA: dict[str, tuple[Any, ...]] = {
    "listops":    (128, 64,  5, "sync_batch", 5e-4, 0.0, 0.0, 5000,  50000,  1, 4, 50,  True,  0.0),
    "text":       (64,  128, 4, "layer",      5e-3, 0.0, 0.1, 10000, 50000,  1, 8, 40,  False, 0.0),
    "retrieval":  (128, 256, 2, "sync_batch", 5e-3, 0.0, 0.0, 312,   50000,  2, 2, 20,  True,  1.0),
    "image":      (64,  512, 6, "sync_batch", 3e-3, 0.0, 0.0, 30000, 50000,  1, 2, 75,  True,  0.0),
    "pathfinder": (128, 128, 6, "batch",      2e-3, 0.0, 0.0, 50000, 500000, 1, 2, 100, False, 0.0),
    "pathx":      (256, 32,  6, "batch",      7.5e-4, 0.0, 0.0, 150000, 500000, 1, 1, 200, True, 1.0),
}
# fmt: on
# [run_lra] GPUs per task: an unsynchronised "batch" norm normalised each GPU's share of the
# batch (Pathfinder: 128 / 8 = 16 examples; Path-X: 256 / 8 = 32), model.batch_norm_groups here.
RUN_LRA_GPUS = {"listops": 8, "text": 2, "retrieval": 8, "image": 8, "pathfinder": 8, "pathx": 8}
# [run_lra] use_series_dict: True for "pathfinderx" only (Hgru2_2d_series; mixer.scan here).
SCANS = {"image": "2d", "pathfinder": "2d", "pathx": "2d_series"}
# [lra_fig] the paper's accuracy.
PAPER_ACCURACY = {
    "listops": 60.52,
    "text": 88.97,
    "retrieval": 95.07,
    "image": 89.33,
    "pathfinder": 93.95,
    "pathx": 98.12,
}
# [lra_fig] the paper's average over the six tasks: sum(PAPER_ACCURACY) = 6 x 87.66.
PAPER_AVERAGE = 87.66
# Each task's settings by column name (and "paper_accuracy").
SETTINGS: dict[str, dict[str, Any]] = {
    task: {**dict(zip(COLUMNS, row, strict=True)), "paper_accuracy": PAPER_ACCURACY[task]}
    for task, row in RUN_LRA.items()
}


def hgrn2_lra_config(task: str, preset: str | None, path: str) -> ml_collections.ConfigDict:
    """The HGRN2 row of ``task``; ``preset="tiny"`` is the HGRN tiny run with an HGRN2 mixer
    (heads of width 4 at the tiny width; Path-X's the series layer, as its paper setting's)."""
    s = SETTINGS[task]

    def paper(c: ml_collections.ConfigDict) -> None:
        m = c.model
        m.features, m.num_layers, m.norm = s["features"], s["num_layers"], s["norm"]
        m.batch_norm_groups = RUN_LRA_GPUS[task] if s["norm"] == "batch" else 1
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

    hgrn = importlib.import_module(f"experiments.configs.lra.{task}")
    c = hgrn2_variant(
        hgrn,
        preset,
        path,
        expand_ratio=s["expand_ratio"],
        tiny_expand_ratio=4,
        paper=paper,
        paper_numbers={"value": s["paper_accuracy"]},
    )
    c.model.mixer.scan = SCANS.get(task, "1d")
    return c
