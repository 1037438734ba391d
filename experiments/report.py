"""The paper's tables with our runs beside them, and a plot of the training curves.

``python -m experiments.report DIR... [--png PATH] [--markdown PATH] [--x step|time]`` finds every
run folder under the folders (a workdir of ``experiments.train``: a run's config.json beside its
``results.json``, ``metrics.jsonl``, ``checkpoints/`` or ``run.lock``) and prints markdown
tables:

- Long Range Arena, ImageNet-1k and WikiText-103: the paper's numbers (from the paper-setting
  configs) and each finished run's (one with results.json) test result at its best validation
  step. Runs of other models (the Transformer baseline, HGRN2) have LRA tables of their own,
  each beside its own paper's numbers: HGRN2's paper averages six tasks (87.66, Path-X's 98.12
  included, for which we have no config), so its table gives the mean of the paper's five rows
  and the paper's average apart; the baseline has no paper numbers. Which paper number
  a run is set beside follows from its config.json (task, mixer kind, width; for WikiText-103
  also layers and vocabulary), never from the ``paper`` field of its results.json. A run
  beside a paper number whose model is not that row's (its config.json's ``model`` keys that
  define the model, :data:`~experiments.tables.MODEL_KEYS`, against the paper config's: the
  layer, depth, width, norm, GLU, encoder, positions, lower bounds, ...; not dropout, remat,
  the recurrence's ``method``, sharding or dtype, which leave the model as it is) is marked
  ``(model differs from the paper's: model.mixer.scan '2d' vs '2d_series', model.num_layers 2
  vs 6)`` (at most three, keys as overridden); a key its config.json lacks (a run of older
  code) is no difference (:func:`~experiments.tables.model_differences`), and a run on
  generated or synthetic data, marked as such, is not compared. A run trained with another
  recipe than that row's (:data:`~experiments.tables.RECIPE_KEYS`: batch size, the optimizer's
  learning rate, weight decay, betas, eps, clipping and decay mask, the schedule, label
  smoothing, dropout, dtype, the data's length and the augmentation) is marked likewise,
  ``(setting differs from the paper's: optimizer.learning_rate 0.01 vs 0.0005, batch_size 16
  vs 128)`` (:func:`~experiments.tables.recipe_differences`); keys that do not change training
  (:data:`~experiments.tables.NOT_RECIPE_KEYS`: evaluation, logging, checkpoints, sharding, data
  folders and workers, resumption, the seed, which is another draw of the same recipe, and
  ``optimizer.accumulate_steps``, the same batch in micro-batches) are not compared, a key
  either side lacks or leaves None is no difference, and the run length has its own note
  below. WikiText-103
  rows are labelled by each run's size and vocabulary (``bytes`` or ``GPT-2 BPE``): the paper's
  perplexity stands only beside runs of its setting, and per-byte perplexity is marked as not
  comparable with it.
- The LRA average of each model is of runs on real data only: a task with only generated or
  synthetic data runs is named under the table, and the average is then not given. A finished
  run that ``--config.resume=restart`` moved into a ``previous-<time>/`` folder keeps its row,
  marked ``(set aside by --config.resume=restart)``, and never enters an average. Where a task
  has several runs it takes (:func:`~experiments.tables.average_run`) a run of the paper's
  model (no difference above) over one of another, then one of the paper's setting (its
  recipe, no difference above, and its length: its config's ``num_train_steps`` the paper
  config's, all done) over one of another recipe or a shorter one, then the
  highest best validation accuracy, then the first in path order: selection on validation, as
  the paper's protocol selects checkpoints, never on the test score (which would flatter the
  average), and not the newest run (file times change when folders are copied). Lines under
  the table name the run it used for each task when a task has several, the used runs shorter
  than the paper's setting, the used runs of another model than the paper's (a task with no
  real-data run of it) and those of another recipe, which the average's cell names too:
  ``76.67 (model differs from the paper's for Path-X)``, ``(setting differs from the paper's
  for ListOps)``.
- Runs without results: run folders without results.json (in progress, preempted, killed,
  failed) or with one that cannot be read (state ``results.json unreadable``), with the last step logged of ``num_train_steps``, the last checkpoint, the best
  validation so far (metrics.jsonl) and the state (:func:`~experiments.runs._state`; a
  stopped run's says why: :func:`~experiments.runs.stopped_state`). They never enter the paper
  tables; a folder of such runs only prints this table. So does a finished run while it is
  trained further (started again with more ``num_train_steps``: running, or stopped before
  its new end), its state saying so: its results.json is of the old end
  (:func:`~experiments.runs.extended_from`).

It also writes the runs' loss and accuracy/perplexity against step, or with ``--x time`` against
training wall time (time-to-accuracy: runs of different models side by side), from each
``metrics.jsonl``, unfinished runs' included (labelled ``(in progress)`` or ``(unfinished)``),
each run in its own colour and marker, to a PNG (default ``DIR/curves.png`` of the first folder).

A run whose results.json is corrupt or incomplete is left out of the paper tables with a warning
(and listed under runs without results when its config.json is a run's); the others are
reported; when the default PNG place cannot be written (a read-only run folder) the curves go to
the temporary folder instead, and the message says where. A folder without any run is an error
(exit code 2). So is an existing ``--markdown`` file or figure that this command did not write
(a file without its first line, a figure not by matplotlib): it is left as it is. Numbers are
rounded half up, as the papers' tables are.

Runs on generated or synthetic data (the ``tiny`` presets) are marked as such, ``(generated
data)`` or ``(synthetic data)``: their numbers show that the pipeline works, not how the model
compares with the paper.

A run's model is HGRN, HGRN2 or the Transformer baseline only where it trained one of the
package's models (results.json's ``model_class``, under ``hgrn_jax.``) and its config.json says
which (``model.mixer.kind``, or a task of the registry, whose models default to HGRN): a task of
one's own (``module:factory``) whose model is its own class (whatever its ``config.model``
says), or which has no ``model.mixer`` (a run older than ``model_class``) trained a model of
its own, listed under "Other
runs" as ``own model (KEY=VALUE, ...)`` (its ``config.model`` settings) whatever its task's name,
never beside a paper's rows. "Other runs" names the task ``NAME (module:factory)`` (the task's
own name, then ``config.task``), runs without results by ``config.task``. A diverged run's
non-finite numbers, which experiments.train writes as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` (in results.json and metrics.jsonl), are read as those numbers: the run keeps its
rows, showing ``nan`` or ``inf``, with a warning; choosing the run an LRA average takes, a NaN
best validation accuracy ranks below any other.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from experiments.curves import X_AXES, plot_curves
from experiments.runs import find_runs, find_unfinished
from experiments.tables import markdown_report


def _png_path(arg: str | None, first_dir: str) -> Path:
    """Where the curves go: ``--png`` (a folder: ``curves.png`` in it; no suffix: ``.png``
    added), by default ``curves.png`` in the first DIR. ValueError naming ``--png`` for a
    format matplotlib cannot write (it printed a traceback after the tables, and for a path
    without a suffix wrote PATH.png but named PATH)."""
    if arg is None:
        return Path(first_dir) / "curves.png"
    path = Path(arg)
    if path.is_dir():
        return path / "curves.png"
    if not path.suffix:
        return path.with_name(path.name + ".png")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(
            f"--png {arg}: matplotlib cannot write {path.suffix} files; end the path with "
            f"one of {', '.join('.' + f for f in sorted(formats))} (.png, say)"
        )
    return path


REPORT_MARK = (
    "<!-- tables written by python -m experiments.report, which replaces this file when run "
    "again -->"
)
"""The first line of a ``--markdown`` file: a file without it is not replaced."""


def _not_ours(path: Path, flag: str) -> str | None:
    """The error for an existing ``path`` that this command did not write (a ``--markdown``
    file without :data:`REPORT_MARK`, a figure that matplotlib did not write), else None:
    a user's file is never written over."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as file:
            head = file.read(4096)
    except OSError as error:
        return f"cannot read {flag} {path} ({error.strerror}); choose another path"
    ours = head.startswith(REPORT_MARK.encode()) if flag == "--markdown" else b"atplotlib" in head
    if ours:
        return None
    return (
        f"{flag} {path} exists and was not written by this command; nothing was changed: "
        f"choose another path{' with --png' if flag == 'the curves' else ''}, or move it away"
    )


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
        png = _png_path(args.png, args.dirs[0])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    taken = _not_ours(png, "--png" if args.png else "the curves") or (
        _not_ours(Path(args.markdown), "--markdown") if args.markdown else None
    )
    if taken:
        print(f"error: {taken}", file=sys.stderr)
        return 2
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
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(f"{REPORT_MARK}\n{report}")
        except OSError as error:
            print(
                f"error: cannot write --markdown {args.markdown} ({error.strerror}); choose a "
                "writable path",
                file=sys.stderr,
            )
            return 2
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
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader went away (| head): the rest is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
