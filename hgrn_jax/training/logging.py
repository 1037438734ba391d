"""What a run writes to its folder: config, metrics (JSON lines and TensorBoard), results, and
the progress bar. Only process 0 writes; the other processes get no-op writers.

Files in the workdir:
  config.json     the resolved config
  metrics.jsonl   one JSON object per logged train step and per evaluation:
                  {"step", "split": "train" | "val" | "test", "loss", "accuracy" | "perplexity",
                   "lr", "steps_per_sec", ...}
  events.jsonl    one JSON object per start of the run, per stop by an error or signal it
                  saw, and per normal end (:meth:`MetricsWriter.event`): {"event": "started"
                  | "stopped" | "finished", "time", "step", "devices", "processes" (started),
                  "notes" (started: what the workdir's check said, as the config changes a
                  resume accepted), "reason" (stopped)}
  tensorboard/    event files (tag "<split>/<metric>")
  results.json    the final numbers (see :func:`write_results`)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hgrn_jax.training.integrity import replace_synced


def jsonable(value: Any) -> Any:
    """``value`` with dict keys as strings, tuples as lists, arrays and numpy scalars as Python
    values, and non-finite floats as strings: what ``json.dumps`` writes."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically and durably (:func:`integrity.replace_synced`)."""
    replace_synced(Path(path), json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


EVENTS_FILE = "events.jsonl"

KEPT_RESULTS = "results-step"
"""The name's start of a finished run's ``results.json`` kept when it trains further
(``results-step<step>.json``: :meth:`MetricsWriter.end`)."""


def read_metric_lines(
    path: Path, *, on_damaged: Callable[[str], None] | None = None
) -> list[tuple[dict[str, Any], str]]:
    """The records of a ``metrics.jsonl`` (or ``events.jsonl``) with their lines. A last line
    without its newline that is not JSON was cut short by a kill and is dropped.

    Any other line that is not a JSON object (or not UTF-8 text) raises ValueError naming
    ``path`` and the line (rewinding would delete it), unless ``on_damaged`` is given: then
    that line is left out and ``on_damaged`` gets a one-line description of it, for readers
    that must go on (the report). A missing file has no records.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    offset = 0
    for number, raw in enumerate(lines, 1):
        start, offset = offset, offset + len(raw) + 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as failure:
            problem = (
                f"{path} is not UTF-8 text (byte {start + failure.start}, line {number}); "
                "nothing was changed. Move it aside to resume this run, or use a new --workdir"
            )
        else:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # no newline after it: a write cut short by a kill
                    continue
                record = None
            if isinstance(record, dict):
                records.append((record, line))
                continue
            problem = (
                f"{path}:{number} is not a JSON record ({line[:60]!r}); nothing was changed. "
                "Mend or delete that line to resume this run"
            )
        if on_damaged is None:
            raise ValueError(problem)
        on_damaged(problem.split(";")[0] + "; that line is left out")
    return records


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem+suffix``, or ``stem-2``, ``stem-3``, ... : the first that does not exist."""
    path, number = folder / f"{stem}{suffix}", 1
    while os.path.lexists(path):
        number += 1
        path = folder / f"{stem}-{number}{suffix}"
    return path


def _new_event_file_suffix(folder: Path) -> str:
    """``""``, or ``"-2"``, ``"-3"``, ...: what keeps the name of a TensorBoard event file made
    now in ``folder`` new. tensorboardX names it by the second and the host and opens it with
    ``"wb"``: a writer made in the same second as the one before (a run resumed in the same
    process) emptied that one's file."""
    stem = f"events.out.tfevents.{str(time.time())[:10]}.{socket.gethostname()}"
    return _free_name(folder, stem, "").name[len(stem) :]


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; a no-op unless ``enabled``."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._tb = None
        self._purge_step: int | None = None  # TensorBoard's: see rewind
        self._jsonl = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

    def check(self) -> None:
        """Raise ValueError, before anything is changed, when :meth:`rewind` could not read
        ``metrics.jsonl`` (:func:`read_metric_lines`)."""
        if self.enabled:
            read_metric_lines(self.workdir / "metrics.jsonl")

    def rewind(self, step: int) -> None:
        """Forget records after ``step``, written by a run that died before its next checkpoint
        and is now resumed from ``step``. TensorBoard's event files are append-only: the new
        one starts with a purge marker (a ``SessionLog.START`` at ``step + 1``), so that
        TensorBoard hides the dead run's points from ``step + 1`` on, which the resumed run
        writes again (each such step showed twice on every curve)."""
        self._keep_records(lambda record: record.get("step", 0) <= step)
        self._purge_step = step + 1

    def end(self, step: int) -> Path | None:
        """Before the final records of a run that ends at ``step``: forget a test record of
        that step (a run rerun after it finished, or killed before its ``results.json``, is
        tested again), and keep the ``results.json`` of an earlier end (a finished run given
        more steps) as ``results-step<its steps>.json`` (the next free name), which this
        returns; its test record stays in ``metrics.jsonl``."""
        if not self.enabled:
            return None
        self._keep_records(lambda r: not (r.get("split") == "test" and r.get("step") == step))
        results = self.workdir / "results.json"
        if not results.is_file():
            return None
        try:
            ended = json.loads(results.read_text(encoding="utf-8")).get("steps")
        except (ValueError, AttributeError):  # not JSON, or not an object: kept all the same
            ended = None
        if ended == step:
            return None
        if isinstance(ended, bool) or not isinstance(ended, int):
            ended = "-unknown"
        kept = _free_name(self.workdir, f"{KEPT_RESULTS}{ended}", ".json")
        os.rename(results, kept)
        return kept

    def _keep_records(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        if not self.enabled:
            return
        path = self.workdir / "metrics.jsonl"
        self._jsonl.close()
        kept = [line for record, line in read_metric_lines(path) if keep(record)]
        replace_synced(path, "".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a", encoding="utf-8")

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        """One record: ``{"step": step, "split": split, **metrics}``."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **jsonable(metrics)}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        # TensorBoard's events are written here, in this thread: tensorboardX's SummaryWriter
        # writes from a thread of its own. The flush after each record mostly met a full disk
        # here first, but a write that failed in that thread (its own timed flush) ended it
        # with a traceback; its queue then filled and the run hung in a later record until the
        # step watchdog ended it (HGRN_STEP_TIMEOUT_S, 30 min), saving nothing.
        from tensorboardX.event_file_writer import EventsWriter  # heavy: the writing process
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        if self._tb is None:  # created at the first record: a run that stops early adds no file
            folder = self.workdir / "tensorboard"
            folder.mkdir(exist_ok=True)
            self._tb = EventsWriter(str(folder / "events"), _new_event_file_suffix(folder))
            if self._purge_step is not None:
                start = SessionLog(status=SessionLog.START)
                self._tb.write_event(
                    Event(wall_time=time.time(), step=self._purge_step, session_log=start)
                )
        for name, value in metrics.items():
            if isinstance(value, (int, float, np.generic)) and math.isfinite(float(value)):
                summary = scalar(f"{split}/{name}", float(value))
                self._tb.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        self._tb.flush()

    def event(self, event: str, **fields: Any) -> None:
        """Append a record of ``event`` (``"started"``, ``"stopped"``, ``"finished"``) to
        ``events.jsonl`` (never rewound: the run's history of starts and stops)."""
        if not self.enabled:
            return
        record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        path = self.workdir / EVENTS_FILE
        with open(path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            cut_short = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            # A record cut short by a kill keeps its own line, so this one stays readable.
            f.write(
                (b"\n" if cut_short else b"") + json.dumps(record, sort_keys=True).encode() + b"\n"
            )

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class ProgressBar:
    """A tqdm bar over the training steps showing loss, steps/s and the time left.

    Quiet when stderr is not a terminal or ``enabled`` is False (other processes).
    """

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        self._bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            # A terminal that reports 0 columns (some pseudo-terminals) gets the default width.
            width = shutil.get_terminal_size().columns or 100
            self._bar = tqdm(
                total=total, initial=initial, unit="step", ncols=min(width, 120), smoothing=0.1
            )

    def update(self, steps: int, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """Print a line (process 0 only) without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def config_as_json(config: Any) -> dict[str, Any]:
    """A config (``ConfigDict`` or mapping) as the JSON object ``config.json`` holds."""
    return jsonable(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def write_config(workdir: str | Path, config: Any) -> None:
    """The resolved config as ``config.json``."""
    write_json(Path(workdir) / "config.json", config_as_json(config))


def write_results(workdir: str | Path, results: dict[str, Any]) -> None:
    """``results.json``: task, metric, best_val, test, paper, data_source (None for a task that
    names none), steps, wall_time_s, num_params, model_class (``module.Class`` of the model
    trained), devices, process_count (and anything else in ``results``)."""
    write_json(Path(workdir) / "results.json", results)
