"""The paper's tables with our runs beside them, and a plot of the training curves.

``python -m experiments.report DIR... [--png PATH] [--markdown PATH] [--x step|time]`` finds every
``results.json`` under the folders (a run's workdir, as written by ``experiments.train``), prints
three markdown tables (Long Range Arena with its average, ImageNet-1k, WikiText-103) with the
paper's numbers (from the paper-setting configs) and each run's test result at its best
validation step (the LRA average uses the first run of each task, in path order; runs of other
models, the Transformer baseline or HGRN2, are marked and have LRA tables and averages of their
own, each beside its own paper numbers: HGRN2's from its paper, over its five tasks; none for the
baseline). Which paper number a run is set beside follows from its config.json (task, mixer kind,
width), never from the ``paper`` field of its results.json. It also writes the
runs' loss and accuracy/perplexity against step, or with ``--x time`` against training wall time
(time-to-accuracy: runs of different models side by side), from each ``metrics.jsonl``, to a PNG
(default ``DIR/curves.png`` of the first folder).

A run whose results.json is corrupt or incomplete is left out with a warning and the others are
reported; when the default PNG place cannot be written (a read-only run folder) the curves go to
the temporary folder instead, and the message says where.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.papers import (
    IMAGENET_SIZES,
    LRA_TASKS,
    lra_paper_accuracy,
    lra_tasks_of,
    paper_numbers,
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
        mixer = self.config.get("model", {}).get("mixer")
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


def _lra_table(kind: str, runs: list[Run], paper: dict[str, dict[str, Any]]) -> str:
    """ListOps ... Path-X and the average of the model with mixer ``kind``: the paper's accuracy
    and each of ``runs``'s test/val accuracy; a task without runs has its paper row, if any."""
    header = ["Task", "Paper acc. (%)", "Ours test (%)", "Ours best val (%)", "Steps", "Run"]
    rows, tests = [], {}  # task -> test accuracy of its first run
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
            tests.setdefault(task, run.results.get("test"))
    tasks = lra_tasks_of(kind)
    papers = [lra_paper_accuracy(paper, kind, t) for t in tasks]
    paper_avg = None if None in papers else sum(papers) / len(tasks)
    scores = [tests.get(t) for t in tasks]
    if all(v is not None for v in scores):
        our_avg = _fmt(sum(float(v) for v in scores) / len(tasks))
    else:
        our_avg = f"— ({sum(t in tests for t in tasks)}/{len(tasks)} tasks run)"
    name = "**Average**" + ("" if kind == "hgrn" else f" ({_model_name(kind)})")
    rows.append([name, _fmt(paper_avg), our_avg, "", "", ""])
    model = "" if kind == "hgrn" else f", {_model_name(kind)}"
    return f"### Long Range Arena{model} (accuracy)\n\n" + _table(header, rows)


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


def wikitext_table(runs: list[Run], paper: dict[str, dict[str, Any]]) -> str:
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
    base = ["HGRN (6 layers, d 512)", _fmt(ref["val_value"]), _fmt(ref["value"])]
    lm_runs = [r for r in runs if r.task == "wikitext103"]
    rows = [base + ["—", "—", "—", "—"]] if not any(r.mixer == "hgrn" for r in lm_runs) else []
    for run in lm_runs:  # the paper's perplexity is HGRN's: other models' runs get none
        model = base if run.mixer == "hgrn" else [_model_name(run.mixer), "—", "—"]
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


def markdown_report(runs: list[Run]) -> str:
    paper = paper_numbers()
    parts = [lra_tables(runs, paper), imagenet_table(runs, paper), wikitext_table(runs, paper)]
    extra = other_table(runs)
    if extra:
        parts.append(extra)
    return "\n\n".join(parts) + "\n"


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


def plot_curves(runs: list[Run], path: str | Path, x: str = "step") -> Path:
    """Loss and accuracy (or perplexity) against step (``x="step"``) or training wall time in
    minutes (``x="time"``: records without ``wall_time_s``, from runs older than that field,
    are left out), one colour per run; train solid, val dashed with markers. Returns the PNG's
    path."""
    x_label = _x_axis(x)[1]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["loss", "accuracy"]
    if any(r.results.get("metric") == "perplexity" for r in runs):
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
                        label=None if labelled else run.label,
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
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not runs:
        print(
            f"error: no results.json under {', '.join(args.dirs)} (or none usable, see the "
            "warnings); finish a run with python -m experiments.train first",
            file=sys.stderr,
        )
        return 2
    report = markdown_report(runs)
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
        written = plot_curves(runs, png, args.x)
    except OSError as error:
        if args.png:
            print(
                f"error: cannot write --png {png} ({error.strerror}); choose a writable path",
                file=sys.stderr,
            )
            return 2
        fallback = Path(tempfile.gettempdir()) / f"hgrn-report-{os.getpid()}-curves.png"
        written = plot_curves(runs, fallback, args.x)
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
