"""The training curves plot: loss and accuracy or perplexity against step or wall time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.runs import Run, Unfinished


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


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def curve_styles(colours: Sequence[str], count: int) -> list[tuple[str, str]]:
    """``(colour, marker)`` of each of ``count`` runs: the colours in turn, the marker changing
    each time they start again, so that ``len(colours) * len(MARKERS)`` runs are told apart."""
    return [
        (colours[i % len(colours)], MARKERS[(i // len(colours)) % len(MARKERS)])
        for i in range(count)
    ]


def plot_curves(runs: Sequence[Run | Unfinished], path: str | Path, x: str = "step") -> Path:
    """Loss and accuracy (or perplexity) against step (``x="step"``) or training wall time in
    minutes (``x="time"``: records without ``wall_time_s``, from runs older than that field,
    are left out), one colour and marker per run (:func:`curve_styles`), unfinished runs'
    metrics so far included (labelled ``(in progress)`` or ``(unfinished)``); train solid with
    a few markers, val dashed with a marker at each point. Returns the PNG's path."""
    x_label = _x_axis(x)[1]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["loss", "accuracy"]
    if any(r.metric == "perplexity" for r in runs):
        metrics.append("perplexity")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    styles = curve_styles(plt.rcParams["axes.prop_cycle"].by_key()["color"], len(runs))
    for run, (colour, marker) in zip(runs, styles):
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
                        marker=marker,
                        markevery=1 if split == "val" else max(1, len(points) // 8),
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
