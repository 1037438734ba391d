"""Finding and reading run folders: finished runs (results.json) and unfinished ones."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hgrn_jax.training.logging import EVENTS_FILE, read_metric_lines
from hgrn_jax.training.workdir import (
    LOCK_NAME,
    RUN_FILES,
    checkpoint_steps,
    is_run_config,
    lock_refresh_age,
    lock_state,
    mixer_kind,
    readable_run_config,
)


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
    def set_aside(self) -> bool:
        """Whether the run was moved aside by ``--config.resume=restart`` (:func:`is_set_aside`)."""
        return is_set_aside(self.path)

    @property
    def model_width(self) -> int | None:
        return self.config.get("model", {}).get("features")

    @property
    def mixer(self) -> str | None:
        """The token mixer's kind: ``"hgrn"`` (the paper's model), ``"hgrn2"`` or ``"attention"``
        (the Transformer baseline); None for a model of the task's own: results.json's
        ``model_class`` is not one of the package's (a model of the user's own, whatever its
        config's ``model.mixer`` says), or, for a run older than that field or without results,
        as its config tells (:func:`model_kind`)."""
        return mixer_of(self.results.get("model_class"), self.config)

    @property
    def task_label(self) -> str:
        """The task as the tables name it: the name its task gave itself (results.json's
        ``task``) followed, where it differs, by ``config.task``, the ``module:factory`` the run
        was started with, which the table of runs without results names them by."""
        configured = self.config.get("task")
        if isinstance(configured, str) and configured != self.task:
            return f"{self.task} ({configured})"
        return self.task

    def non_finite(self) -> list[str]:
        """``KEY = VALUE`` of the numbers the tables read that are not finite (NaN or inf:
        a diverged run), results.json order."""
        return [
            f"{key} = {value}"
            for key, value in self.results.items()
            if key in TABLE_NUMBERS and is_number(value) and not math.isfinite(value)
        ]


def _registry_mixer(task: str) -> str:
    """The ``model.mixer.kind`` a run of registry task ``task`` without ``model.mixer`` in its
    config built: its model config class's default (:func:`_registry_mixers`); HGRN's for a
    name this checkout's registry lacks (a run of a registry extended as docs/tasks.md shows,
    whose models are the package's: experiments.train takes no other name without ``:``)."""
    return _registry_mixers().get(task, "hgrn")


@functools.cache
def _registry_mixers() -> dict[str, str]:
    """Each registry task's default ``model.mixer.kind`` (HGRN for all of them); imported when
    first needed, as it loads the models (JAX)."""
    try:
        from hgrn_jax.tasks.registry import TASKS, model_defaults
    except ImportError:  # the models cannot be loaded here: their default is HGRN's
        return {}
    return {task: mixer_kind(model_defaults({"task": task})) for task in TASKS}


def mixer_of(model_class: Any, config: Any) -> str | None:
    """The token mixer's kind of a run that trained ``model_class`` (``module.Class``, as
    results.json and the start records say it; None where they do not) with ``config``: None
    for a class outside the package (a model of the user's own, whatever ``config.model``
    says), else as the config tells (:func:`model_kind`)."""
    if isinstance(model_class, str) and not model_class.startswith(PACKAGE_MODELS):
        return None
    return model_kind(config)


def model_kind(config: Any) -> str | None:
    """The token mixer's kind of a run's config (config.json): its ``model.mixer.kind``
    (:func:`~hgrn_jax.training.workdir.mixer_kind`: HGRN's where ``model.mixer`` names none);
    without a ``model.mixer``, the default of the model of its task where ``config.task`` is a
    name of the registry (:func:`_registry_mixer`); None otherwise: a ``module:factory`` (or
    ``module:DATASET``) task without ``model.mixer`` builds a model the report cannot tell
    (tests/toy_task.py's has no HGRN layer; it was labelled HGRN and set beside HGRN's paper
    rows)."""
    if not isinstance(config, dict):
        return None
    model = config.get("model")
    if isinstance(model, dict) and isinstance(model.get("mixer"), dict):
        return mixer_kind(config)
    task = config.get("task")
    if not isinstance(task, str) or not task or ":" in task:
        return None
    return _registry_mixer(task)


class BrokenRunError(ValueError):
    """A run folder whose results.json (or config.json) cannot be used; ``path``: that file."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BrokenRunError(
            f"{path} is not valid JSON ({error}); was the run interrupted while writing it?", path
        ) from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a metrics.jsonl or events.jsonl (a truncated last line, from a
    killed run, is skipped); a damaged line is left out with a warning naming it, so that one
    bad line does not hide the run (:func:`~hgrn_jax.training.logging.read_metric_lines`)."""
    return [record for record, _ in read_metric_lines(path, on_damaged=_warn)]


def _warn(problem: str) -> None:
    print(f"warning: {problem}", file=sys.stderr)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records (:func:`_read_records`), a non-finite number written as a string
    read as the float it is (:func:`with_numbers`)."""
    return [with_numbers(record, ("split",)) for record in _read_records(path)]


REQUIRED_RESULTS = ("task", "metric", "test")

# Where the package's models live: a results.json ``model_class`` elsewhere is a user's model.
PACKAGE_MODELS = "hgrn_jax."

# The strings experiments.train writes for non-finite floats (hgrn_jax.training.logging.jsonable:
# ``str(value)``), JSON having no NaN or infinity.
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# results.json's fields that hold text (write_results), never read as numbers.
TEXT_RESULTS = ("task", "metric", "data_source", "stopped_by", "model_class")

# results.json's numbers that the tables show or choose runs by.
TABLE_NUMBERS = ("test", "best_val", "num_params", "steps")


def with_numbers(record: dict[str, Any], text_keys: tuple[str, ...]) -> dict[str, Any]:
    """``record`` with each value that is one of the strings experiments.train writes for a
    non-finite float (``"nan"``, ``"inf"``, ``"-inf"``: :data:`NON_FINITE`) as that float, but
    for ``text_keys``; any other string stays as it is."""
    return {
        key: NON_FINITE[value]
        if key not in text_keys and isinstance(value, str) and value in NON_FINITE
        else value
        for key, value in record.items()
    }


def is_number(value: Any) -> bool:
    """Whether a JSON value is a number (an int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(
    results_path: Path, results: dict[str, Any], config_path: Path, config: dict[str, Any]
) -> None:
    """BrokenRunError naming the file and key when a field the tables read has the wrong type
    (valid JSON that experiments.train would not have written)."""
    wrong = []
    if not isinstance(results["task"], str):
        wrong.append((results_path, "task", "a string"))
    if not is_number(results["test"]):
        wrong.append((results_path, "test", "a number"))
    for key in ("best_val", "num_params"):
        if key in results and not is_number(results[key]):
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
            "experiments.train?",
            path,
        )


def _config_of(run_dir: Path, quiet: bool = False) -> tuple[Path, Any]:
    """``(file, config)``: the run's config.json or, where it is lost or not JSON, the copy in
    its newest checkpoint (:func:`~hgrn_jax.training.workdir.config_copy`; a warning on
    stderr). A run with neither raises BrokenRunError: its model cannot be told (it used to
    be reported as HGRN's, beside HGRN's paper number)."""
    config_path = run_dir / "config.json"
    source, config, problem = readable_run_config(run_dir)
    if config is None:
        raise BrokenRunError(
            f"{config_path} {problem} and no checkpoint holds a copy of the run's config, so "
            "its model cannot be told; put back the config.json the run wrote",
            config_path,
        )
    if problem and not quiet:
        print(
            f"warning: {config_path} {problem}; using the copy of the run's config in {source}",
            file=sys.stderr,
        )
    return source, config


def _read_results(run_dir: Path, quiet: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's results.json and config (:func:`_config_of`, its warning left out when
    ``quiet``), checked for the fields the tables read; BrokenRunError naming the file
    otherwise."""
    results_path = run_dir / "results.json"
    try:
        results = _read_json(results_path)
        config_path, config = _config_of(run_dir, quiet)
    except OSError as error:
        raise BrokenRunError(
            f"{error.filename or run_dir} cannot be read ({error.strerror})",
            Path(error.filename or run_dir),
        ) from None
    if not isinstance(results, dict) or any(key not in results for key in REQUIRED_RESULTS):
        raise BrokenRunError(
            f"{results_path} lacks {', '.join(REQUIRED_RESULTS)} (holds "
            f"{json.dumps(results)[:80]}); was it written by experiments.train?",
            results_path,
        )
    if not isinstance(config, dict):
        raise BrokenRunError(f"{config_path} does not hold a config (a JSON object)", config_path)
    results = with_numbers(results, TEXT_RESULTS)  # a diverged run's "test": "nan"
    _check_types(results_path, results, config_path, config)
    return results, config


def extended_from(run_dir: Path, results: dict[str, Any], config: dict[str, Any]) -> int | None:
    """The steps of a finished run's results.json while the run is trained further (started
    again after it finished, with more ``num_train_steps`` in its config.json; running now or
    stopped before its new end), else None. Its results.json stays until the new end, which
    keeps it as ``results-step<N>.json``: until then the run has no final results."""
    events = [
        record.get("event")
        for record, _ in read_metric_lines(run_dir / EVENTS_FILE, on_damaged=lambda _: None)
    ]
    if "finished" not in events:
        return None
    after_the_end = events[len(events) - events[::-1].index("finished") :]
    steps, target = results.get("steps"), config.get("num_train_steps")
    if "started" in after_the_end and is_number(steps) and is_number(target) and target > steps:
        return int(steps)
    return None


def folders_holding(folders: list[str | Path], name: str) -> list[Path]:
    """The folders under ``folders`` (each included) that hold a file ``name``, each once
    however many of ``folders`` reach it (a folder and its parent, one given twice), through
    folder links too (a run linked into a folder of runs); a link back up is not followed
    twice. In the order found, as given."""
    found, seen = [], set()
    for folder in folders:
        for root, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:
                dirs[:] = []  # reached before: through another link, or another of folders
                continue
            seen.add(real)
            dirs.sort()
            if name in files:
                found.append(Path(root))
    return found


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
    for run_dir in folders_holding(folders, "results.json"):
        try:
            results, config = _read_results(run_dir)
        except ValueError as error:
            if not skip_broken:
                raise
            print(f"warning: skipping {run_dir}: {error}", file=sys.stderr)
            continue
        if extended_from(run_dir, results, config) is not None:
            continue  # being trained further: find_unfinished lists it
        run = Run(run_dir, results, config, _read_metrics(run_dir / "metrics.jsonl"))
        runs.append(run)
        if non_finite := run.non_finite():
            print(
                f"warning: {run_dir}: results.json's {', '.join(non_finite)} (not "
                "finite: did the run diverge?); shown as such in the tables",
                file=sys.stderr,
            )
    return sorted(runs, key=lambda r: str(r.path))


@dataclass
class Unfinished:
    """A run folder without usable results: a run in progress, one that stopped before the end
    (preempted, killed, failed), or one whose results.json cannot be read. ``state``: see :func:`_state`; ``checkpoint``: the last
    committed checkpoint's step (None without one)."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    state: str
    checkpoint: int | None
    model_class: str | None = None  # events.jsonl's newest start's (None before that field)

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
    def mixer(self) -> str | None:
        """As :attr:`Run.mixer`, from the model class its newest start recorded."""
        return mixer_of(self.model_class, self.config)

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
            if r.get("split") == "val"
            and is_number(r.get(self.metric))
            and math.isfinite(r[self.metric])
            and "step" in r
        ]
        if not found:
            return None
        sign = -1 if self.metric == "perplexity" else 1
        return max(found, key=lambda pair: (sign * pair[0], -pair[1]))


def is_set_aside(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a ``previous-<time>/`` folder that ``--config.resume=restart``
    moved a run into, inside the workdir of the run that replaced it."""
    return run_dir.name.startswith("previous-") and (run_dir.parent / "config.json").is_file()


def _results_state(run_dir: Path) -> tuple[bool, int | None]:
    """For a run folder with a results.json, read once: whether it is there but cannot be used
    (corrupt, incomplete, fields of the wrong type; :func:`find_runs` warns about it), and
    :func:`extended_from` of one that can."""
    try:
        results, config = _read_results(run_dir, quiet=True)
    except BrokenRunError as error:
        return error.path == run_dir / "results.json", None
    return False, extended_from(run_dir, results, config)


def _state(run_dir: Path, events: list[dict[str, Any]]) -> str:
    """``running`` (its run.lock is held by a live process of this host), ``suspended`` (by
    a process of this host stopped by Ctrl-Z or SIGSTOP), ``locked by HOST``
    (a lock from another host: how long ago its holder last refreshed it, by this machine's
    clock, when it refreshes it at all), ``set aside`` (a ``previous-<time>/`` folder that
    ``--config.resume=restart`` kept), or ``stopped`` (no live lock), with the reason the run
    recorded in ``events``, its events.jsonl (:func:`stopped_state`)."""
    if is_set_aside(run_dir):
        return "set aside (--config.resume=restart)"
    lock, holder = lock_state(run_dir)
    if lock == "live":
        return "running"
    if lock == "suspended":
        pid = holder.get("pid")
        return f"suspended (Ctrl-Z or SIGSTOP; kill -CONT {pid} resumes it)"
    if lock == "unchecked":
        host = holder.get("host", "?")
        refresh = lock_refresh_age(run_dir / LOCK_NAME, holder)
        if refresh is None:
            return f"locked by {host} (cannot be checked from here)"
        age, stale_s = refresh
        if age <= stale_s:
            return (
                f"locked by {host} (running there: its lock was refreshed in the last "
                f"{stale_s:g} s)"
            )
        return (
            f"locked by {host}, not refreshed for {_duration(age)} (its run is gone; the next "
            "run takes the lock over)"
        )
    return stopped_state(events)


def stopped_state(events: list[dict[str, Any]]) -> str:
    """Why a run without a live lock stopped, from the last record of its events.jsonl:
    ``stopped at TIME: REASON`` (an error or signal the run saw, a NaN loss included);
    ``stopped (killed, crashed or lost: ...)`` when its last start recorded no stop (SIGKILL, a
    lost host, the watchdog's exit 3); ``finished at TIME, but its results.json is gone`` (a
    run ended normally whose results were deleted); plain ``stopped`` for runs older than these
    records."""
    events = [r for r in events if isinstance(r.get("event"), str)]
    if not events:
        return "stopped"
    last = events[-1]
    if last["event"] == "stopped":
        return f"stopped at {last.get('time', '?')}: {last.get('reason', '?')}"
    if last["event"] == "finished":
        return f"finished at {last.get('time', '?')}, but its results.json is gone"
    return (
        f"stopped (killed, crashed or lost: the start at {last.get('time', '?')} recorded no "
        "stop; its log says more)"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def find_unfinished(folders: list[str | Path]) -> list[Unfinished]:
    """Every run folder under ``folders`` without usable results, sorted by path: a folder whose
    config.json is a run's (:func:`~hgrn_jax.training.workdir.is_run_config`) beside its lock
    or run files (metrics.jsonl, checkpoints/, ...) and no results.json, or one that cannot be
    used (state ``results.json unreadable``). Another program's config.json is passed over; one
    that cannot be read, beside run files, is left out with a warning on stderr."""
    found = []
    for run_dir in folders_holding(folders, "config.json"):
        config_path = run_dir / "config.json"
        has_results = (run_dir / "results.json").exists()
        unreadable, extended = _results_state(run_dir) if has_results else (False, None)
        if (has_results and not unreadable and extended is None) or not any(
            (run_dir / name).exists() for name in (*RUN_FILES, LOCK_NAME)
        ):
            continue
        try:
            config = _read_json(config_path)
        except (OSError, ValueError) as error:
            print(f"warning: skipping {run_dir}: {error}", file=sys.stderr)
            continue
        records = _read_metrics(run_dir / "metrics.jsonl")
        events = _read_records(run_dir / EVENTS_FILE)
        if not is_run_config(config) or not _written_by_a_run(run_dir, records + events):
            continue
        steps = checkpoint_steps(run_dir)
        checkpoint = steps[-1] if steps else None
        state = (
            "results.json unreadable (see the warning)" if unreadable else _state(run_dir, events)
        )
        if extended is not None:
            state = (
                f"{state}; trained further from its finished {extended} steps to "
                f"{config.get('num_train_steps')} (their results.json is kept)"
            )
        starts = [e for e in events if e.get("event") == "started"]
        model_class = starts[-1].get("model_class") if starts else None
        found.append(Unfinished(run_dir, config, records, state, checkpoint, model_class))
    return sorted(found, key=lambda run: str(run.path))


def _written_by_a_run(run_dir: Path, records: list[dict[str, Any]]) -> bool:
    """Whether ``run_dir``'s files are a run's of this program: its lock, checkpoint folders,
    or ``records`` (of metrics.jsonl and events.jsonl) with a ``split`` or a start (another
    program's folder with a config.json naming a task and a model, and a metrics.jsonl of its
    own, was listed as a stopped run)."""
    if (run_dir / LOCK_NAME).exists() or any(
        (run_dir / name).is_dir() for name in ("checkpoints", "checkpoints.damaged")
    ):
        return True
    return any(
        record.get("split") in ("train", "val", "test") or record.get("event") == "started"
        for record in records
    )
