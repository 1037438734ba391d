"""The markdown tables: the papers' numbers beside the runs, and the runs without results."""

from __future__ import annotations

import decimal
import functools
import importlib
import json
import math
from typing import Any

from experiments.papers import (
    IMAGENET_SIZES,
    LRA_TASKS,
    PAPER_LM,
    lm_setting,
    lra_paper_accuracy,
    lra_paper_average,
    lra_paper_steps,
    paper_numbers,
)
from experiments.runs import Run, Unfinished, is_number

LRA_NAMES = {
    "listops": "ListOps",
    "text": "Text",
    "retrieval": "Retrieval",
    "image": "Image",
    "pathfinder": "Pathfinder",
    "pathx": "Path-X",
}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    # Half up, as papers round (28.125 -> 28.13; format's half-to-even gave 28.12), of the
    # shortest decimal that reads back as the float (2.675 -> 2.68).
    rounded = decimal.Decimal(repr(value)).quantize(
        decimal.Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_UP
    )
    return f"{rounded:.{digits}f}"


MIXER_NAMES = {"hgrn": "HGRN", "hgrn2": "HGRN2", "attention": "Transformer baseline"}


def _model_name(kind: str) -> str:
    return MIXER_NAMES.get(kind, kind)


OWN_MODEL = "own model"
"""The label of a run whose model the report cannot tell (:func:`~experiments.runs.model_kind`:
a ``module:factory`` task without ``model.mixer``), never a paper model's."""

PAPER_TASKS = (*LRA_TASKS, "imagenet", "wikitext103")


def _in_paper_tables(run: Run) -> bool:
    """Whether ``run`` goes into a paper's table: a task of the papers with a model the report
    can tell (HGRN, HGRN2, the Transformer baseline); the others go under "Other runs"."""
    return run.task in PAPER_TASKS and run.mixer is not None


# Data made up by the package (docs/data.md): "generated" is ListOps's set of LRA's
# specification, "synthetic" the small stand-ins of the tiny presets. Their numbers show that the
# pipeline works, not how the model compares with the paper.
STAND_IN_SOURCES = ("generated", "synthetic")


SET_ASIDE = "set aside by --config.resume=restart"


def _note(run: Run) -> str:
    """The run's folder, marked when its data were generated or synthetic, its model is not
    HGRN, it was set aside by ``--config.resume=restart`` (replaced by a newer run), its
    model is not the one of the paper's row it is set beside (:func:`model_differences`), or it
    trained with another recipe than that row's (:func:`recipe_differences`)."""
    marks = [_model_name(run.mixer)] if run.mixer not in ("hgrn", None) else []
    marks += [f"{run.data_source} data"] if run.data_source in STAND_IN_SOURCES else []
    marks += [SET_ASIDE] if run.set_aside else []
    if differences := model_differences(run):
        marks.append(f"{MODEL_DIFFERS}: {_differences_text(differences)}")
    if differences := recipe_differences(run):
        marks.append(f"{SETTING_DIFFERS}: {_differences_text(differences)}")
    return f"{run.label}" + "".join(f" ({mark})" for mark in marks)


MODEL_DIFFERS = "model differs from the paper's"

# The keys under ``config.model`` that define the model a paper's row is of (the fields of
# ClassifierConfig, ImageConfig, LMConfig and MixerConfig), in the order a difference is named:
# the mixer and the size first. A run's config.json and the paper config are compared on these.
MODEL_KEYS = (
    "mixer.kind",
    "mixer.layout",
    "mixer.scan",
    "mixer.expand_ratio",
    "num_layers",
    "features",
    "mixer.num_heads",
    "mixer.complex_valued",
    "mixer.separate_phases",
    "mixer.use_forget_gate",
    "mixer.norm_before_gate",
    "mixer.use_bias",
    "mixer.norm_epsilon",
    "use_lower_bound",
    "norm",
    # norm="batch" per slice of the batch: what BatchNorm normalises over in training (HGRN2's
    # Pathfinder and Path-X: 8 slices, as its 8 unsynchronised GPUs did), as "sync_batch" does.
    "batch_norm_groups",
    "norm_epsilon",
    "glu_expand",
    "glu_activation",
    "glu_bias",
    "encoder",
    "position_encoding",
    "pooling",
    "dual",
    "scale_embeddings",
    "tie_embeddings",
    "head_norm_epsilon",
    "patch_size",
    "image_size",
    # The data's shape; 0 or unset (the data settle them) is no difference: DATA_SETTLED.
    "vocab_size",
    "num_classes",
    "input_channels",
    "grid_shape",
)
DATA_SETTLED = ("vocab_size", "num_classes", "input_channels", "grid_shape")
"""MODEL_KEYS that a task fills in from its data where the config leaves them at 0 or unset
(:func:`hgrn_jax.tasks.settings.settle`, ``check_vocab_size``): such a value is not compared."""
NOT_MODEL_KEYS = {
    # Regularisation in training, like the optimizer's weight decay: the same parameters and the
    # same function at evaluation. Compared as the recipe (RECIPE_KEYS), not as the model.
    "dropout": "training regularisation (a RECIPE_KEYS key)",
    "position_dropout": "training regularisation (a RECIPE_KEYS key)",
    # How the same function is computed: recomputation in the backward pass, the recurrence's
    # algorithm (every method computes the same scan), sharding over a mesh, precision.
    "remat": "recomputation",
    "mixer.method": "the recurrence's algorithm",
    "mixer.sequence_axis": "sharding",
    "axis_name": "sharding",
    "lower_bound_dtype": "precision (a RECIPE_KEYS key, as config.dtype)",
}
"""Model config fields that do not change the model, never compared. The deprecated flat
aliases (``model.complex_valued``, ``model.method``, ...; LEGACY_MIXER_FIELDS) are not
compared either: the paper configs have none (they use ``model.mixer``)."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"mixer.scan": "2d", "num_layers": 6, ...}`` of a config's ``model`` (a dict)."""
    if not isinstance(tree, dict):
        return {}
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resolved(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` (:func:`_flat`) with the None that the mixer reads as its default replaced by
    that default (MixerConfig.resolved_expand_ratio and .resolved): a config that leaves
    HGRN2's head width unset has the official layout's 2, as one that sets 2."""
    resolved = dict(model)
    if "mixer.expand_ratio" in model and model["mixer.expand_ratio"] is None:
        kind, layout = model.get("mixer.kind", "hgrn"), model.get("mixer.layout", "official")
        default = (2 if layout == "official" else 128) if kind == "hgrn2" else 1
        resolved["mixer.expand_ratio"] = default
    for name in ("complex_valued", "separate_phases", "use_forget_gate", "norm_before_gate"):
        if f"mixer.{name}" in model and model[f"mixer.{name}"] is None:
            resolved[f"mixer.{name}"] = True
    if "mixer.use_bias" in model and model["mixer.use_bias"] is None:
        resolved["mixer.use_bias"] = True
    return resolved


def paper_config_name(run: Run) -> str | None:
    """The config module (under ``experiments.configs``) whose paper numbers the run is set
    beside, as :func:`~experiments.papers.paper_numbers` reads them: ``lra.TASK`` (HGRN),
    ``hgrn2.TASK``, ``imagenet.tiny`` / ``imagenet.small`` (HGRN at the width of either),
    ``lm.wikitext103`` (a run of :data:`PAPER_LM`); None for a run beside no paper number (the
    Transformer baseline, other widths and settings, tasks of one's own)."""
    kind, task = run.mixer, run.task
    if task in LRA_TASKS:
        return {"hgrn": f"lra.{task}", "hgrn2": f"hgrn2.{task}"}.get(kind or "")
    if _is_paper_imagenet_run(run) and run.model_width in IMAGENET_SIZES:
        return f"imagenet.{IMAGENET_SIZES[run.model_width].split('-')[1].lower()}"
    if task == "wikitext103" and _lm_setting(run) == PAPER_LM:
        return "lm.wikitext103"
    return None


@functools.cache
def _paper_model(name: str) -> dict[str, Any]:
    """The paper config ``name``'s model (:func:`_paper_config`'s ``model.`` keys without that
    prefix, :func:`_resolved`). Do not modify it (cached)."""
    model = {
        k[len("model.") :]: v for k, v in _paper_config(name).items() if k.startswith("model.")
    }
    return _resolved(model)


def model_differences(run: Run) -> list[tuple[str, str, str]]:
    """``(key, run's value, paper's value)`` of each :data:`MODEL_KEYS` key on which the run's
    config.json and the config of the paper's row it is set beside (:func:`paper_config_name`)
    differ, in that order, the values as the tables show them (``'2d'``, ``6``, ``unset (2)``:
    a None that the mixer reads as its default, :func:`_resolved`, compared as that default);
    [] for a run beside no paper number, and for a run on generated or synthetic data (the tiny
    presets' smaller models): its row already says that its numbers do not compare with the
    paper's, and no average takes it. A key that either lacks (a run of older code, a config of
    one's own) is no difference, nor a :data:`DATA_SETTLED` one that either leaves to the
    data."""
    name = paper_config_name(run)
    if name is None or not _is_real_data(run):
        return []
    raw = _flat(run.config.get("model"))
    paper, ours = _paper_model(name), _resolved(raw)
    differences = []
    for key in MODEL_KEYS:
        if key not in paper or key not in ours:
            continue
        if key in DATA_SETTLED and any(v in (None, 0, "", []) for v in (ours[key], paper[key])):
            continue
        if ours[key] != paper[key]:
            shown = _value_text(ours[key])
            if raw[key] is None and ours[key] is not None:
                shown = f"unset ({shown})"
            differences.append((f"model.{key}", shown, _value_text(paper[key])))
    return differences


SETTING_DIFFERS = "setting differs from the paper's"

# The keys of a config (outside the model's MODEL_KEYS) that define how a paper's row trained:
# the recipe, in the order a difference is named (the learning rate and the batch first), keys
# as the user overrides them. The run length (num_train_steps) is compared apart
# (:func:`_is_paper_length`), with its own note.
RECIPE_KEYS = (
    "optimizer.learning_rate",
    "batch_size",
    "optimizer.weight_decay",
    "optimizer.name",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.eps",
    "optimizer.grad_clip_norm",
    "optimizer.weight_decay_mask",
    "schedule.name",
    "schedule.warmup_steps",
    "schedule.decay_steps",
    "schedule.min_lr",
    "schedule.warmup_lr",
    "schedule.steps_per_epoch",
    "label_smoothing",
    "model.dropout",
    "model.position_dropout",
    "dtype",
    "model.lower_bound_dtype",
    # The data a step reads: its length and size, and the augmentation of the image tasks.
    "data.seq_len",
    "data.image_size",
    "data.grayscale",
    "data.wikitext_release",
    "data.augment",
    "data.augment.randaugment",
    "data.augment.color_jitter",
    "data.augment.interpolation",
    "data.augment.mixup",
    "data.augment.cutmix",
    "data.augment.mixup_switch_prob",
    "data.augment.mixup_group_size",
    "data.augment.random_erasing",
    "data.repeated_augmentation",
)
NOT_RECIPE_KEYS = {
    # Compared elsewhere: the task is the table's row, the model MODEL_KEYS, the length
    # _is_paper_length (epochs is what num_train_steps is derived from).
    "task": "the row itself",
    "num_train_steps": "the run length, compared apart",
    "epochs": "the run length (num_train_steps is derived from it)",
    "max_train_time_s": "the run length (a run it stopped has fewer steps than the paper's)",
    "data.train_examples": "the run length's epochs (num_train_steps is derived from it)",
    # Another draw of the same recipe, not another recipe: the paper reports one seed of it.
    "seed": "another draw of the same recipe",
    # The same batch of batch_size examples a step, split into micro-batches whose gradients
    # are averaged: the same update (BatchNorm's statistics per micro-batch aside: a model of
    # norm="batch" should keep 1, as batch_norm_groups, which MODEL_KEYS compares, says).
    "optimizer.accumulate_steps": "the same batch in micro-batches",
    # Not training: evaluation, logging, checkpoints, resumption, sharding, the paper's numbers.
    "eval_batch_size": "evaluation",
    "eval_every": "evaluation",
    "log_every": "logging",
    "checkpoint_every": "checkpoints",
    "keep_checkpoints": "checkpoints",
    "resume": "resumption",
    "mesh.data": "sharding",
    "mesh.fsdp": "sharding",
    "mesh.model": "sharding",
    "model.remat": "recomputation",
    "model.mixer.method": "the recurrence's algorithm",
    "model.mixer.sequence_axis": "sharding",
    "model.axis_name": "sharding",
    "paper.metric": "the paper's numbers",
    "paper.value": "the paper's numbers",
    "paper.val_value": "the paper's numbers",
    "paper.num_params": "the paper's numbers",
    "paper.task": "the paper's numbers",
    "paper.mixer": "the paper's numbers",
    # Where the real data are read from and how: the same examples.
    "data.source": "where the data are read from",
    "data.lra_dir": "a data folder",
    "data.tfds_dir": "a data folder",
    "data.manual_dir": "a data folder",
    "data.wikitext_dir": "a data folder",
    "data.tokenizer_path": "a data folder",
    "data.cache_dir": "a data folder",
    "data.workers": "data loading",
    "data.skip_bad_rows": "data loading (the releases have no bad rows)",
    # Generated or synthetic data only, whose runs are not compared.
    "data.generator_seed": "generated data",
    "data.min_length": "generated data",
    "data.max_length": "generated data",
    "data.max_depth": "generated data",
    "data.max_args": "generated data",
    "data.path_length": "generated data",
    "data.val_examples": "generated data",
    "data.test_examples": "generated data",
    "data.train_bytes": "synthetic data",
    "data.eval_bytes": "synthetic data",
}
"""Config keys that do not change how a paper's row trains, never compared as the recipe; every
key of the paper configs outside ``model`` (and ``model``'s NOT_MODEL_KEYS) is here or in
RECIPE_KEYS."""


@functools.cache
def _paper_config(name: str) -> dict[str, Any]:
    """The paper config ``name`` (:func:`_flat`, through JSON as config.json is). Do not modify
    it (cached)."""
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    return _flat(json.loads(json.dumps(config.to_dict())))


def recipe_differences(run: Run) -> list[tuple[str, str, str]]:
    """``(key, run's value, paper's value)`` of each :data:`RECIPE_KEYS` key on which the run's
    config.json and the config of the paper's row it is set beside (:func:`paper_config_name`)
    differ, in that order, the values as the tables show them; [] for a run beside no paper
    number or on generated or synthetic data (as :func:`model_differences`). A key that either
    lacks (a run of older code) or leaves unset (None: the code's default) is no difference."""
    name = paper_config_name(run)
    if name is None or not _is_real_data(run):
        return []
    paper, ours = _paper_config(name), _flat(run.config)
    differences = []
    for key in RECIPE_KEYS:
        if key not in paper or key not in ours or None in (paper[key], ours[key]):
            continue
        if ours[key] != paper[key]:
            differences.append((key, _value_text(ours[key]), _value_text(paper[key])))
    return differences


def _value_text(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def _differences_text(differences: list[tuple[str, str, str]], shown: int = 3) -> str:
    """``model.mixer.scan '2d' vs '2d_series', model.num_layers 2 vs 6`` (the run's value, then
    the paper's), the first ``shown`` of them and how many more."""
    text = ", ".join(f"{key} {ours} vs {paper}" for key, ours, paper in differences[:shown])
    more = len(differences) - shown
    return text + (f" and {more} more" if more > 0 else "")


def _is_paper_model(run: Run) -> bool:
    """Whether the run's model is its paper row's (:func:`model_differences` finds none)."""
    return not model_differences(run)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def lra_tables(runs: list[Run], paper: dict[str, dict[str, Any]]) -> str:
    """One Long Range Arena table per model, HGRN's first, then any other's that has runs
    (HGRN2, the Transformer baseline): each beside its own paper's numbers, with its own
    average, so that no column mixes two papers."""
    run_kinds = {run.mixer for run in runs if run.task in LRA_TASKS}
    kinds = ["hgrn", *sorted(run_kinds - {"hgrn"})]
    return "\n\n".join(
        _lra_table(kind, [run for run in runs if run.mixer == kind], paper) for kind in kinds
    )


def _is_real_data(run: Run) -> bool:
    """Whether the run read real data (a release or prepared set), not generated or synthetic."""
    return run.data_source not in STAND_IN_SOURCES


def _paper_steps(run: Run) -> int | None:
    return lra_paper_steps(run.mixer, run.task) if run.task in LRA_TASKS else None


def _is_paper_setting(run: Run) -> bool:
    """Whether the LRA run trained in the paper's setting: as long (:func:`_is_paper_length`)
    and with its recipe (:func:`recipe_differences` finds none)."""
    return _is_paper_length(run) and not recipe_differences(run)


def _is_paper_length(run: Run) -> bool:
    """Whether the LRA run trained as long as the paper's setting: its config.json's
    ``num_train_steps`` is the paper config's, and it did them all (not stopped by a time
    budget)."""
    steps = _paper_steps(run)
    return (
        steps is not None
        and run.config.get("num_train_steps") == steps
        and is_number(run.results.get("steps"))
        and run.results["steps"] >= steps
    )


def _best_val(run: Run) -> float:
    """The run's best validation accuracy; -inf without one or for a NaN (a diverged run)."""
    value = run.results.get("best_val")
    return float(value) if is_number(value) and not math.isnan(value) else -math.inf


def average_run(task_runs: list[Run]) -> Run | None:
    """The run of one LRA task that its model's average takes: of the runs on real data that
    were not set aside by ``--config.resume=restart`` (None without one), those of the paper's
    model (:func:`_is_paper_model`) before those of another, then those of the paper's setting
    (:func:`_is_paper_setting`: its recipe and length) before the others, then the highest best validation accuracy,
    then the first in path order. Never the test score: picking by it would flatter the
    average."""
    real = [run for run in task_runs if _is_real_data(run) and not run.set_aside]
    if not real:
        return None
    return max(real, key=lambda run: (_is_paper_model(run), _is_paper_setting(run), _best_val(run)))


def _our_average(tasks: tuple[str, ...], used: dict[str, Run]) -> str:
    """The mean test accuracy of the runs ``used`` for ``tasks``, or how many tasks have one;
    marked where a run it takes is of another model than the paper's (:func:`_is_paper_model`)
    or of another recipe (:func:`recipe_differences`)."""
    if not all(t in used for t in tasks):
        return f"— ({sum(t in used for t in tasks)}/{len(tasks)} tasks with real-data runs)"
    average = _fmt(sum(float(used[t].results["test"]) for t in tasks) / len(tasks))
    other = [LRA_NAMES[t] for t in tasks if not _is_paper_model(used[t])]
    recipe = [LRA_NAMES[t] for t in tasks if recipe_differences(used[t])]
    marks = [f"{MODEL_DIFFERS} for {', '.join(other)}"] if other else []
    marks += [f"{SETTING_DIFFERS} for {', '.join(recipe)}"] if recipe else []
    return average + "".join(f" ({mark})" for mark in marks)


def _lra_table(kind: str, runs: list[Run], paper: dict[str, dict[str, Any]]) -> str:
    """ListOps ... Path-X and the average of the model with mixer ``kind``: the paper's accuracy
    and each of ``runs``'s test/val accuracy; a task without runs has its paper row, if any.
    The average is of one real-data run per task (:func:`average_run`); lines under the table
    say which runs it used where a task has several, which of them are shorter than the paper's
    setting, of another model than the paper's (:func:`model_differences`) or of another recipe
    (:func:`recipe_differences`; the average's cell names the tasks of these two), and which tasks it leaves out for having only generated or synthetic
    data runs.
    HGRN2 without a real-data Path-X run (as before its Path-X config, ``Hgru2_2d_series``) gets
    the average of its other five tasks beside the mean of the paper's five rows, and the paper's
    six-task average on a row of its own."""
    header = ["Task", "Paper acc. (%)", "Ours test (%)", "Ours best val (%)", "Steps", "Run"]
    rows = []
    for task in LRA_TASKS:
        task_runs = [r for r in runs if r.task == task]
        paper_accuracy = _fmt(lra_paper_accuracy(paper, kind, task))
        if not task_runs and paper_accuracy != "—":
            rows.append([LRA_NAMES[task], paper_accuracy, "—", "—", "—", "—"])
        for run in task_runs:
            rows.append(
                [
                    LRA_NAMES[task],
                    paper_accuracy,
                    _fmt(run.results.get("test")),
                    _fmt(run.results.get("best_val")),
                    str(run.results.get("steps", "—")),
                    _note(run),
                ]
            )
    tasks = LRA_TASKS
    by_task = {t: [r for r in runs if r.task == t] for t in tasks}
    used = {t: chosen for t in tasks if (chosen := average_run(by_task[t])) is not None}
    model = "" if kind == "hgrn" else f", {_model_name(kind)}"
    reported = lra_paper_average(kind)
    if kind == "hgrn2" and "pathx" not in used:
        # HGRN2 without a real-data Path-X run (runs from before its config): its other five
        # tasks' average beside the mean of the paper's five rows, and the paper's own six-task
        # average apart, as before Path-X had a config.
        five = tuple(t for t in tasks if t != "pathx")
        papers = [lra_paper_accuracy(paper, kind, t) for t in five]
        rows.append(
            [
                f"**Average** ({_model_name(kind)}, {len(five)} tasks without Path-X)",
                f"{_fmt(sum(papers) / len(five))} (mean of the paper's {len(five)} rows above)",
                _our_average(five, used),
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"**Paper's average** ({_model_name(kind)}, {reported[1]} tasks)",
                _fmt(reported[0]),
                "— (no real-data Path-X run)",
                "",
                "",
                "",
            ]
        )
    else:
        name = "**Average**" + (f" ({_model_name(kind)})" if model else "")
        rows.append(
            [name, _fmt(reported[0] if reported else None), _our_average(tasks, used), "", "", ""]
        )
    notes = []
    if used and any(len(by_task[t]) > 1 for t in tasks):
        notes.append(
            "Average of: "
            + "; ".join(f"{LRA_NAMES[t]} {used[t].label}" for t in tasks if t in used)
            + " (per task: real data; the paper's model; the paper's setting (recipe and number "
            "of steps); the best validation accuracy, never the test score)"
        )
    for title, differences_of in (
        ("Not the paper's model (no real-data run of it)", model_differences),
        ("Not the paper's recipe", recipe_differences),
    ):
        differing = {t: d for t in tasks if t in used and (d := differences_of(used[t]))}
        if differing:
            notes.append(
                f"{title}: "
                + "; ".join(
                    f"{LRA_NAMES[t]} {used[t].label} ({_differences_text(d)})"
                    for t, d in differing.items()
                )
            )
    short = [t for t in tasks if t in used and not _is_paper_length(used[t])]
    if short:
        notes.append(
            "Shorter than the paper's setting: "
            + "; ".join(
                f"{LRA_NAMES[t]} {used[t].label} ({used[t].results.get('steps', '?')} of "
                f"{_paper_steps(used[t]) or '?'} steps)"
                for t in short
            )
        )
    stand_in_only = [
        LRA_NAMES[t]
        for t in tasks
        if t not in used and any(not run.set_aside for run in by_task[t])
    ]
    if stand_in_only:
        notes.append(
            "Not in the average (generated or synthetic data only): " + ", ".join(stand_in_only)
        )
    table = f"### Long Range Arena{model} (accuracy)\n\n" + _table(header, rows)
    return "\n\n".join([table, "\n".join(f"- {note}" for note in notes)] if notes else [table])


def _is_paper_imagenet_run(run: Run) -> bool:
    """An ImageNet run of the paper's model (HGRN), which the paper's rows are compared with."""
    return run.task == "imagenet" and run.mixer == "hgrn"


def imagenet_table(runs: list[Run], paper: dict[str, dict[str, Any]]) -> str:
    header = [
        "Model",
        "Paper params",
        "Paper top-1 (%)",
        "Ours params",
        "Ours top-1 (%)",
        "Ours best val (%)",
        "Run",
    ]
    rows = []
    for width, name in IMAGENET_SIZES.items():
        ref = paper[f"imagenet-{name.split('-')[1].lower()}"]
        matching = [r for r in runs if _is_paper_imagenet_run(r) and r.model_width == width]
        base = [name, f"{ref['num_params'] / 1e6:.2f}M", _fmt(ref["value"])]
        if not matching:
            rows.append(base + ["—", "—", "—", "—"])
        for run in matching:
            rows.append(
                base
                + [
                    f"{run.results.get('num_params', 0) / 1e6:.2f}M",
                    _fmt(run.results.get("test")),
                    _fmt(run.results.get("best_val")),
                    _note(run),
                ]
            )
    for run in runs:
        if run.task == "imagenet" and not (
            _is_paper_imagenet_run(run) and run.model_width in IMAGENET_SIZES
        ):
            model = "other" if run.mixer == "hgrn" else _model_name(run.mixer)
            rows.append(
                [
                    f"{model} (d={run.model_width})",
                    "—",
                    "—",
                    f"{run.results.get('num_params', 0) / 1e6:.2f}M",
                    _fmt(run.results.get("test")),
                    _fmt(run.results.get("best_val")),
                    _note(run),
                ]
            )
    return "### ImageNet-1k (top-1 accuracy)\n\n" + _table(header, rows)


def _lm_setting(run: Run) -> tuple[str, Any, Any, str]:
    return lm_setting(run.mixer, run.data_source, run.config)


def _lm_name(kind: str, layers: Any, width: Any, tokenizer: str) -> str:
    name = f"{_model_name(kind)} ({layers if layers is not None else '?'} layers, d "
    name += f"{width if width is not None else '?'}, {tokenizer})"
    if tokenizer == "bytes":
        name += " (per-byte perplexity: not comparable)"
    return name


def wikitext_table(runs: list[Run], paper: dict[str, dict[str, Any]]) -> str:
    """The paper's perplexity beside the runs of its setting (:data:`PAPER_LM`) only; every
    other run is labelled by its own model, size and vocabulary, and a byte-level run's
    perplexity (per byte) is marked as not comparable with the paper's (per BPE token)."""
    ref = paper["wikitext103"]
    header = [
        "Model",
        "Paper val ppl",
        "Paper test ppl",
        "Ours val ppl",
        "Ours test ppl",
        "Steps",
        "Run",
    ]
    base = [_lm_name(*PAPER_LM), _fmt(ref["val_value"]), _fmt(ref["value"])]
    lm_runs = [r for r in runs if r.task == "wikitext103"]
    rows = [] if any(_lm_setting(r) == PAPER_LM for r in lm_runs) else [base + ["—"] * 4]
    for run in lm_runs:
        setting = _lm_setting(run)
        model = base if setting == PAPER_LM else [_lm_name(*setting), "—", "—"]
        rows.append(
            model
            + [
                _fmt(run.results.get("best_val")),
                _fmt(run.results.get("test")),
                str(run.results.get("steps", "—")),
                _note(run),
            ]
        )
    return "### WikiText-103 (perplexity, lower is better)\n\n" + _table(header, rows)


def other_table(runs: list[Run]) -> str | None:
    """The runs outside the paper tables (:func:`_in_paper_tables`): tasks of the user's own,
    and any run of a model the report cannot tell."""
    others = [r for r in runs if not _in_paper_tables(r)]
    if not others:
        return None
    rows = [
        [
            r.task_label,
            _model_size(r.config, r.mixer) if r.config else "—",
            str(r.results.get("metric")),
            _fmt(r.results.get("test")),
            _fmt(r.results.get("best_val")),
            str(r.results.get("steps", "—")),
            _note(r),
        ]
        for r in others
    ]
    header = ["Task", "Model", "Metric", "Test", "Best val", "Steps", "Run"]
    return "### Other runs\n\n" + _table(header, rows)


def _model_size(config: dict[str, Any], kind: str | None) -> str:
    """``HGRN (L layers, d D)`` (or HGRN2's, the Transformer baseline's) for the mixer ``kind``
    a run trained (:attr:`~experiments.runs.Run.mixer`); for None, ``own model`` with the
    config's ``model`` settings (:func:`_own_model`), never a paper model's name."""
    model = config.get("model", {})
    if kind is None:
        return _own_model(model)
    size = f"{model.get('num_layers', '?')} layers, d {model.get('features', '?')}"
    return f"{_model_name(kind)} ({size})"


def _own_model(model: Any, shown: int = 4) -> str:
    """``own model (KEY=VALUE, ...)``: the first ``shown`` numbers, strings and booleans of a
    task's own ``config.model`` in key order (what tells two runs of the task apart), no
    meaning read into them."""
    if not isinstance(model, dict):
        return OWN_MODEL
    settings = [
        f"{key}={value}"
        for key, value in sorted(model.items())
        if isinstance(value, (bool, int, float, str))
    ]
    if not settings:
        return OWN_MODEL
    more = ", …" if len(settings) > shown else ""
    return f"{OWN_MODEL} ({', '.join(settings[:shown])}{more})"


def unfinished_table(runs: list[Unfinished]) -> str | None:
    """The runs without results.json: how far each got, its best validation so far, its state."""
    if not runs:
        return None
    header = [
        "Run",
        "Task",
        "Model",
        "Last step logged",
        "Last checkpoint",
        "Best val so far",
        "State",
    ]
    rows = []
    for run in runs:
        total = run.config.get("num_train_steps", "?")
        last = "—" if run.last_step is None else str(run.last_step)
        best = run.best_val()
        rows.append(
            [
                run.label,
                run.task,
                _model_size(run.config, run.mixer),
                f"{last} / {total}",
                "—" if run.checkpoint is None else str(run.checkpoint),
                "—" if best is None else f"{_fmt(best[0])} {run.metric} (step {best[1]})",
                run.state,
            ]
        )
    return "### Runs without results\n\n" + _table(header, rows)


def markdown_report(runs: list[Run], unfinished: list[Unfinished] | None = None) -> str:
    """The paper tables of the finished ``runs`` (none without one) and the table of the
    ``unfinished`` ones, which never enter the paper tables."""
    parts = []
    if runs:
        paper = paper_numbers()
        ours = [run for run in runs if _in_paper_tables(run)]
        parts += [lra_tables(ours, paper), imagenet_table(ours, paper), wikitext_table(ours, paper)]
        parts.append(other_table(runs))
    parts.append(unfinished_table(unfinished or []))
    return "\n\n".join(part for part in parts if part) + "\n"
