"""The paper's tables with our runs beside them, and a plot of the training curves.

``python -m experiments.report DIR... [--png PATH] [--markdown PATH] [--x step|time]`` finds every
run folder under the folders (a workdir of ``experiments.train``: a run's config.json beside its
``results.json``, ``metrics.jsonl``, ``checkpoints/`` or ``run.lock``) and prints markdown
tables:

- Long Range Arena, ImageNet-1k and WikiText-103: the paper's numbers (from the paper-setting
  configs) and each finished run's (one with results.json) test result at its best validation
  step. Runs of other models (the Transformer baseline, HGRN2) have LRA tables of their own,
  each beside its own paper's numbers: HGRN2's paper averages six tasks (87.66, Path-X's 98.12
  included, for which we have no config), so its table gives the mean of its five rows, labelled
  as ours, and the paper's average apart; the baseline has no paper numbers. Which paper number
  a run is set beside follows from its config.json (task, mixer kind, width; for WikiText-103
  also layers and vocabulary), never from the ``paper`` field of its results.json. WikiText-103
  rows are labelled by each run's size and vocabulary (``bytes`` or ``GPT-2 BPE``): the paper's
  perplexity stands only beside runs of its setting, and per-byte perplexity is marked as not
  comparable with it.
- The LRA average of each model is of runs on real data only: a task with only generated or
  synthetic data runs is named under the table, and the average is then not given. Where a task
  has several runs it takes (:func:`average_run`) a run of the paper's setting (its config's
  ``num_train_steps`` the paper config's, all done) over a shorter one, then the highest best
  validation accuracy, then the first in path order: selection on validation, as the paper's
  protocol selects checkpoints, never on the test score (which would flatter the average), and
  not the newest run (file times change when folders are copied). Lines under the table name
  the run it used for each task when a task has several, and the used runs shorter than the
  paper's setting.
- Runs without results: run folders without results.json (in progress, preempted, killed,
  failed), with the last step logged of ``num_train_steps``, the last checkpoint, the best
  validation so far (metrics.jsonl) and the state (:func:`_state`). They never enter the paper
  tables; a folder of such runs only prints this table.

It also writes the runs' loss and accuracy/perplexity against step, or with ``--x time`` against
training wall time (time-to-accuracy: runs of different models side by side), from each
``metrics.jsonl``, unfinished runs' included (labelled ``(in progress)`` or ``(unfinished)``),
to a PNG (default ``DIR/curves.png`` of the first folder).

A run whose results.json is corrupt or incomplete is left out with a warning and the others are
reported; when the default PNG place cannot be written (a read-only run folder) the curves go to
the temporary folder instead, and the message says where. A folder without any run is an error
(exit code 2).

Runs on generated or synthetic data (the ``tiny`` presets) are marked as such, ``(generated
data)`` or ``(synthetic data)``: their numbers show that the pipeline works, not how the model
compares with the paper.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.papers import (
    IMAGENET_SIZES,
    LRA_TASKS,
    lra_paper_accuracy,
    lra_paper_average,
    lra_paper_steps,
    lra_tasks_of,
    paper_numbers,
)
from hgrn_jax.training.workdir import (
    LOCK_NAME,
    RUN_FILES,
    checkpoint_steps,
    is_run_config,
    lock_state,
)

LRA_NAMES = {
    "listops": "ListOps",
    "text": "Text",
    "retrieval": "Retrieval",
    "image": "Image",
    "pathfinder": "Pathfinder",
    "pathx": "Path-X",
}


@dataclass
class Run:
    """One finished run: its folder, results.json, config.json (if any) and metric records."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def task(self) -> str:
        return str(self.results.get("task", "?"))

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def curve_label(self) -> str:
        return self.label

    @property
    def metric(self) -> str:
        return str(self.results.get("metric"))

    @property
    def data_source(self) -> str | None:
        """The ``data.source`` the run's task read: results.json's ``data_source`` (None for a
        ``module:factory`` task, which reads what it reads); for a run older than that field,
        config.json's ``data.source`` when the task is one of the package's (a factory's
        config may carry a source it never read)."""
        if "data_source" in self.results:
            source = self.results["data_source"]
            return None if source is None else str(source)
        if ":" in str(self.config.get("task", self.task)):
            return None
        source = self.config.get("data", {}).get("source")
        return None if source is None else str(source)

    @property
    def model_width(self) -> int | None:
        return self.config.get("model", {}).get("features")

    @property
    def mixer(self) -> str:
        """The token mixer's kind: ``"hgrn"`` (the paper's model), ``"hgrn2"`` or ``"attention"``
        (the Transformer baseline)."""
        return _mixer_kind(self.config)


def _mixer_kind(config: dict[str, Any]) -> str:
    mixer = config.get("model", {}).get("mixer")
    return str(mixer.get("kind", "hgrn")) if isinstance(mixer, dict) else "hgrn"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); was the run interrupted while writing it?"
        ) from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a truncated last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


REQUIRED_RESULTS = ("task", "metric", "test")


class BrokenRunError(ValueError):
    """A run folder whose results.json (or config.json) cannot be used."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(
    results_path: Path, results: dict[str, Any], config_path: Path, config: dict[str, Any]
) -> None:
    """BrokenRunError naming the file and key when a field the tables read has the wrong type
    (valid JSON that experiments.train would not have written)."""
    wrong = []
    if not isinstance(results["task"], str):
        wrong.append((results_path, "task", "a string"))
    if not _is_number(results["test"]):
        wrong.append((results_path, "test", "a number"))
    for key in ("best_val", "num_params"):
        if key in results and not _is_number(results[key]):
            wrong.append((results_path, key, "a number"))
    for key in ("data", "model"):
        if key in config and not isinstance(config[key], dict):
            wrong.append((config_path, key, "an object"))
    mixer = config.get("model", {}).get("mixer") if isinstance(config.get("model"), dict) else None
    if mixer is not None and not isinstance(mixer, dict):
        wrong.append((config_path, "model.mixer", "an object"))
    if wrong:
        path, key, kind = wrong[0]
        value = results.get(key) if path == results_path else config.get(key.split(".")[0])
        raise BrokenRunError(
            f"{path}: {key} should be {kind}, not {json.dumps(value)[:40]}; was it written by "
            "experiments.train?"
        )


def _read_run(run_dir: Path) -> Run:
    results_path, config_path = run_dir / "results.json", run_dir / "config.json"
    try:
        results = _read_json(results_path)
        config = _read_json(config_path) if config_path.is_file() else {}
    except OSError as error:
        raise BrokenRunError(
            f"{error.filename or run_dir} cannot be read ({error.strerror})"
        ) from None
    if not isinstance(results, dict) or any(key not in results for key in REQUIRED_RESULTS):
        raise BrokenRunError(
            f"{results_path} lacks {', '.join(REQUIRED_RESULTS)} (holds "
            f"{json.dumps(results)[:80]}); was it written by experiments.train?"
        )
    if not isinstance(config, dict):
        raise BrokenRunError(f"{config_path} does not hold a config (a JSON object)")
    _check_types(results_path, results, config_path, config)
    return Run(
        path=run_dir,
        results=results,
        config=config,
        records=_read_records(run_dir / "metrics.jsonl"),
    )


def find_runs(folders: list[str | Path], *, skip_broken: bool = False) -> list[Run]:
    """Every run (a folder with results.json) under ``folders``, sorted by path.

    A run whose results.json or config.json is corrupt, empty or incomplete raises ValueError
    naming the file, or with ``skip_broken`` is left out with a warning on stderr.
    """
    runs = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(
                f"{folder} does not exist; pass run folders (workdirs of "
                "experiments.train) or folders that contain them"
            )
        for results_path in sorted(folder.rglob("results.json")):
            try:
                runs.append(_read_run(results_path.parent))
            except ValueError as error:
                if not skip_broken:
                    raise
                print(f"warning: skipping {results_path.parent}: {error}", file=sys.stderr)
    return sorted(runs, key=lambda r: str(r.path))


@dataclass
class Unfinished:
    """A run folder without results.json: a run in progress, or one that stopped before the end
    (preempted, killed, failed). ``state``: see :func:`_state`; ``checkpoint``: the last
    committed checkpoint's step (None without one)."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    state: str
    checkpoint: int | None

    @property
    def task(self) -> str:
        return str(self.config.get("task", "?"))

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def curve_label(self) -> str:
        return f"{self.path} ({'in progress' if self.state == 'running' else 'unfinished'})"

    @property
    def metric(self) -> str:
        """``perplexity`` or ``accuracy``: what the run's validation records carry."""
        if any("perplexity" in record for record in self.records):
            return "perplexity"
        return "perplexity" if self.task == "wikitext103" else "accuracy"

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.records if isinstance(r.get("step"), int)]
        return max(steps) if steps else None

    def best_val(self) -> tuple[float, int] | None:
        """``(value, step)`` of the best validation record so far (the highest accuracy, the
        lowest perplexity), or None before the first evaluation."""
        found = [
            (float(r[self.metric]), r["step"])
            for r in self.records
            if r.get("split") == "val" and _is_number(r.get(self.metric)) and "step" in r
        ]
        if not found:
            return None
        sign = -1 if self.metric == "perplexity" else 1
        return max(found, key=lambda pair: (sign * pair[0], -pair[1]))


def _state(run_dir: Path) -> str:
    """``running`` (its run.lock is held by a live process of this host), ``locked by HOST``
    (a lock from another host, which cannot be checked from here), ``set aside`` (a
    ``previous-<time>/`` folder that ``--config.resume=restart`` kept), or ``stopped`` (no
    live lock: preempted, killed or failed alike, since nothing in the folder records a
    failure: a NaN loss stops the run before it is logged)."""
    if run_dir.name.startswith("previous-") and (run_dir.parent / "config.json").is_file():
        return "set aside (--config.resume=restart)"
    lock, holder = lock_state(run_dir)
    if lock == "live":
        return "running"
    if lock == "unchecked":
        return f"locked by {holder.get('host', '?')} (cannot be checked from here)"
    return "stopped"


def find_unfinished(folders: list[str | Path]) -> list[Unfinished]:
    """Every run folder under ``folders`` without results.json, sorted by path: a folder whose
    config.json is a run's (:func:`~hgrn_jax.training.workdir.is_run_config`) beside its lock
    or run files (metrics.jsonl, checkpoints/, ...). Another program's config.json is passed
    over; one that cannot be read, beside run files, is left out with a warning on stderr."""
    found = []
    for folder in folders:
        for config_path in sorted(Path(folder).rglob("config.json")):
            run_dir = config_path.parent
            if (run_dir / "results.json").exists() or not any(
                (run_dir / name).exists() for name in (*RUN_FILES, LOCK_NAME)
            ):
                continue
            try:
                config = _read_json(config_path)
            except (OSError, ValueError) as error:
                print(f"warning: skipping {run_dir}: {error}", file=sys.stderr)
                continue
            if not is_run_config(config):
                continue
            records = _read_records(run_dir / "metrics.jsonl")
            steps = checkpoint_steps(run_dir)
            checkpoint = steps[-1] if steps else None
            found.append(Unfinished(run_dir, config, records, _state(run_dir), checkpoint))
    return sorted(found, key=lambda run: str(run.path))


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


MIXER_NAMES = {"hgrn": "HGRN", "hgrn2": "HGRN2", "attention": "Transformer baseline"}


def _model_name(kind: str) -> str:
    return MIXER_NAMES.get(kind, kind)


# Data made up by the package (docs/data.md): "generated" is ListOps's set of LRA's
# specification, "synthetic" the small stand-ins of the tiny presets. Their numbers show that the
# pipeline works, not how the model compares with the paper.
STAND_IN_SOURCES = ("generated", "synthetic")


def _note(run: Run) -> str:
    """The run's folder, marked when its data were generated or synthetic, or its model is not
    HGRN."""
    marks = [_model_name(run.mixer)] if run.mixer != "hgrn" else []
    marks += [f"{run.data_source} data"] if run.data_source in STAND_IN_SOURCES else []
    return f"{run.label}" + "".join(f" ({mark})" for mark in marks)


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
    """Whether the LRA run trained as long as the paper's setting: its config.json's
    ``num_train_steps`` is the paper config's, and it did them all (not stopped by a time
    budget)."""
    steps = _paper_steps(run)
    return (
        steps is not None
        and run.config.get("num_train_steps") == steps
        and _is_number(run.results.get("steps"))
        and run.results["steps"] >= steps
    )


def _best_val(run: Run) -> float:
    value = run.results.get("best_val")
    return float(value) if _is_number(value) else -math.inf


def average_run(task_runs: list[Run]) -> Run | None:
    """The run of one LRA task that its model's average takes: of the runs on real data (None
    without one), those of the paper's setting (:func:`_is_paper_setting`) before shorter ones,
    then the highest best validation accuracy, then the first in path order. Never the test
    score: picking by it would flatter the average."""
    real = [run for run in task_runs if _is_real_data(run)]
    if not real:
        return None
    return max(real, key=lambda run: (_is_paper_setting(run), _best_val(run)))


def _lra_table(kind: str, runs: list[Run], paper: dict[str, dict[str, Any]]) -> str:
    """ListOps ... Path-X and the average of the model with mixer ``kind``: the paper's accuracy
    and each of ``runs``'s test/val accuracy; a task without runs has its paper row, if any.
    The average is of one real-data run per task (:func:`average_run`); lines under the table
    say which runs it used where a task has several, which of them are shorter than the paper's
    setting, and which tasks it leaves out for having only generated or synthetic data runs."""
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
    tasks = lra_tasks_of(kind)
    by_task = {t: [r for r in runs if r.task == t] for t in tasks}
    used = {t: chosen for t in tasks if (chosen := average_run(by_task[t])) is not None}
    if len(used) == len(tasks):
        our_avg = _fmt(sum(float(used[t].results["test"]) for t in tasks) / len(tasks))
    else:
        our_avg = f"— ({len(used)}/{len(tasks)} tasks with real-data runs)"
    papers = [lra_paper_accuracy(paper, kind, t) for t in tasks]
    mean_of_rows = None if None in papers else sum(papers) / len(tasks)
    model = "" if kind == "hgrn" else f", {_model_name(kind)}"
    reported = lra_paper_average(kind)
    if reported is None or reported[1] == len(tasks):
        name = "**Average**" + (f" ({_model_name(kind)})" if model else "")
        rows.append([name, _fmt(reported[0] if reported else None), our_avg, "", "", ""])
    else:  # the paper averages tasks we have no config for: its average is not our rows' mean
        missing = ", ".join(LRA_NAMES[t] for t in LRA_TASKS if t not in tasks)
        rows.append(
            [
                f"**Average** ({_model_name(kind)}, {len(tasks)} tasks without {missing})",
                f"{_fmt(mean_of_rows)} (mean of the rows above, not the paper's)",
                our_avg,
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"**Paper's average** ({_model_name(kind)}, {reported[1]} tasks)",
                _fmt(reported[0]),
                f"— (no config for {missing})",
                "",
                "",
                "",
            ]
        )
    notes = []
    if any(len(by_task[t]) > 1 for t in tasks):
        notes.append(
            "Average of: "
            + "; ".join(f"{LRA_NAMES[t]} {used[t].label}" for t in tasks if t in used)
            + " (per task: real data; the paper's number of steps; the best validation "
            "accuracy, never the test score)"
        )
    short = [t for t in tasks if t in used and not _is_paper_setting(used[t])]
    if short:
        notes.append(
            "Shorter than the paper's setting: "
            + "; ".join(
                f"{LRA_NAMES[t]} {used[t].label} ({used[t].results.get('steps', '?')} of "
                f"{_paper_steps(used[t]) or '?'} steps)"
                for t in short
            )
        )
    stand_in_only = [LRA_NAMES[t] for t in tasks if by_task[t] and t not in used]
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


def _tokenizer(run: Run) -> str:
    """The LM run's vocabulary: ``bytes`` (the synthetic corpus, or ``data.tokenizer_path=bytes``),
    ``GPT-2 BPE`` (the BPE files at ``data.tokenizer_path``, the paper's), or ``tokenizer
    unknown`` (a config.json without the key)."""
    data = run.config.get("data", {})
    path = data.get("tokenizer_path")
    if run.data_source == "synthetic" or path == "bytes":
        return "bytes"
    return "GPT-2 BPE" if path else "tokenizer unknown"


PAPER_LM = ("hgrn", 6, 512, "GPT-2 BPE")
"""The paper's WikiText-103 setting: model, layers, width, vocabulary."""


def _lm_setting(run: Run) -> tuple[str, Any, Any, str]:
    model = run.config.get("model", {})
    return run.mixer, model.get("num_layers"), model.get("features"), _tokenizer(run)


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
    known = set(LRA_TASKS) | {"imagenet", "wikitext103"}
    others = [r for r in runs if r.task not in known]
    if not others:
        return None
    rows = [
        [
            r.task,
            str(r.results.get("metric")),
            _fmt(r.results.get("test")),
            _fmt(r.results.get("best_val")),
            _note(r),
        ]
        for r in others
    ]
    return "### Other runs\n\n" + _table(["Task", "Metric", "Test", "Best val", "Run"], rows)


def _model_size(config: dict[str, Any]) -> str:
    model = config.get("model", {})
    size = f"{model.get('num_layers', '?')} layers, d {model.get('features', '?')}"
    return f"{_model_name(_mixer_kind(config))} ({size})"


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
                _model_size(run.config),
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
        parts += [lra_tables(runs, paper), imagenet_table(runs, paper), wikitext_table(runs, paper)]
        parts.append(other_table(runs))
    parts.append(unfinished_table(unfinished or []))
    return "\n\n".join(part for part in parts if part) + "\n"


# ----------------------------------------------------------------------------- curves


def _metric_value(record: dict[str, Any], metric: str) -> float | None:
    """``record[metric]``; train records of LM runs carry the loss only: perplexity = exp(loss)."""
    value = record.get(metric)
    if value is None and metric == "perplexity" and "accuracy" not in record:
        loss = record.get("loss")
        value = math.exp(min(loss, 700.0)) if isinstance(loss, (int, float)) else None
    return float(value) if isinstance(value, (int, float)) else None


# x axis name -> (record key, axis label, scale of the key's values)
X_AXES = {
    "step": ("step", "step", 1.0),
    "time": ("wall_time_s", "training wall time (minutes)", 1 / 60),
}


def _x_axis(x: str) -> tuple[str, str, float]:
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; choose one of {', '.join(X_AXES)}")
    return X_AXES[x]


def curve_points(run: Run, split: str, metric: str, x: str = "step") -> list[tuple[float, float]]:
    """``(x, metric)`` of ``run``'s ``split`` records in x order: x is the step, or (``x="time"``)
    the training wall time in minutes, leaving out records without ``wall_time_s`` (written
    before that field existed)."""
    key, _, scale = _x_axis(x)
    return sorted(
        (record[key] * scale, value)
        for record in run.records
        if record.get("split") == split
        and isinstance(record.get(key), (int, float))
        and (value := _metric_value(record, metric)) is not None
    )


def plot_curves(runs: Sequence[Run | Unfinished], path: str | Path, x: str = "step") -> Path:
    """Loss and accuracy (or perplexity) against step (``x="step"``) or training wall time in
    minutes (``x="time"``: records without ``wall_time_s``, from runs older than that field,
    are left out), one colour per run, unfinished runs' metrics so far included (labelled
    ``(in progress)`` or ``(unfinished)``); train solid, val dashed with markers. Returns the
    PNG's path."""
    x_label = _x_axis(x)[1]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["loss", "accuracy"]
    if any(r.metric == "perplexity" for r in runs):
        metrics.append("perplexity")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        for ax, metric in zip(axes[0], metrics):
            labelled = False
            for split, style in (("train", "-"), ("val", "--")):
                points = curve_points(run, split, metric, x)
                if points:
                    steps, values = zip(*points)
                    ax.plot(
                        steps,
                        values,
                        style,
                        color=colour,
                        marker="o" if split == "val" else None,
                        markersize=3,
                        label=None if labelled else run.curve_label,
                    )
                    labelled = True
    for ax, metric in zip(axes[0], metrics):
        ax.set_title(f"{metric}: train solid, validation dashed", fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric + (" (%)" if metric == "accuracy" else ""))
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    by_label = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    handles, labels = list(by_label.values()), list(by_label)
    if handles:
        fig.legend(
            handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7, frameon=False
        )
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 4), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Print the paper's tables beside the runs found under DIR... and plot their "
        "training curves.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run folders or their parents")
    parser.add_argument(
        "--png", default=None, help="where to write the curves (default: DIR/curves.png, first DIR)"
    )
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument(
        "--x",
        choices=list(X_AXES),
        default="step",
        help="the curves' x axis: step, or training wall time (time-to-accuracy comparisons)",
    )
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dirs, skip_broken=True)
        unfinished = find_unfinished(args.dirs)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not runs and not unfinished:
        print(
            f"error: no run folder under {', '.join(args.dirs)} (none with a results.json, "
            "metrics.jsonl or checkpoints/ beside its config.json, or none usable, see the "
            "warnings); start a run with python -m experiments.train first",
            file=sys.stderr,
        )
        return 2
    report = markdown_report(runs, unfinished)
    print(report)
    if args.markdown:
        try:
            Path(args.markdown).write_text(report)
        except OSError as error:
            print(
                f"error: cannot write --markdown {args.markdown} ({error.strerror}); choose a "
                "writable path",
                file=sys.stderr,
            )
            return 2
    png = Path(args.png) if args.png else Path(args.dirs[0]) / "curves.png"
    try:
        written = plot_curves([*runs, *unfinished], png, args.x)
    except OSError as error:
        if args.png:
            print(
                f"error: cannot write --png {png} ({error.strerror}); choose a writable path",
                file=sys.stderr,
            )
            return 2
        fallback = Path(tempfile.gettempdir()) / f"hgrn-report-{os.getpid()}-curves.png"
        written = plot_curves([*runs, *unfinished], fallback, args.x)
        print(
            f"warning: cannot write {png} ({error.strerror}); wrote the curves to {written} "
            "instead (choose the place with --png PATH)",
            file=sys.stderr,
        )
    print(f"training curves: {written}")
    return 0


if __name__ == "__main__":
    from experiments import cli

    cli.show_warnings_on_one_line()
    sys.exit(main())
