"""Command-line plumbing shared by ``experiments.train`` and ``experiments.prepare``: user errors
(a bad flag, config file or value; missing or malformed data) as one line on stderr with exit
code 2, instead of a traceback; warnings as one line each (:func:`show_warnings_on_one_line`,
which the other tools use too)."""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

EXIT_USAGE = 2
"""Exit code of a user error."""


def one_line(message: str) -> str:
    """``message`` with its lines joined by ``; `` (by a space after a line that ends with a
    colon, which introduces the next: ``3 bad example(s) in FILE: FILE:8: ...``)."""
    joined = ""
    for line in (line.strip() for line in str(message).splitlines()):
        if line:
            joined += (" " if joined.endswith(":") else "; " if joined else "") + line
    return joined


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: <message on one line>`` to stderr and exit with ``code``."""
    # In a multi-process run every process may fail; the index says which one spoke.
    who = f"process {os.environ['JAX_PROCESS_ID']}: " if os.environ.get("JAX_PROCESS_ID") else ""
    print(f"error: {who}{one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def exit_past_stuck_threads(code: int, grace_s: float = 5.0) -> None:
    """Exit with ``code`` now when threads other than the main one are still running
    ``grace_s`` seconds after a failure was reported; return when there are none.

    A checkpoint save that fails early (its folder cannot be made: the file system is out of
    space or inodes, or read-only) leaves Orbax's signalling threads waiting 300 s for the
    folder, and Python waits for them at exit: the run said why it stopped, then hung five
    minutes. The exit handlers (JAX's distributed shutdown among them) still run; the threads
    are not waited for. Only after a failure: every save the run completed was awaited
    before it was reported."""
    import atexit
    import threading
    import time

    def waited_for() -> list[threading.Thread]:
        main = threading.main_thread()
        return [
            t
            for t in threading.enumerate()
            if t is not main and not t.daemon and not _is_pool_worker(t)
        ]

    # Polled, not joined: Orbax's threads raise TimeoutError from join(timeout).
    deadline = time.monotonic() + grace_s
    while waited_for() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not waited_for():
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _is_pool_worker(thread: Any) -> bool:
    """Whether ``thread`` is an idle-able ``concurrent.futures`` pool worker (the ImageNet
    decoders'), which the interpreter's exit stops at once, unlike a stuck save's thread."""
    target = getattr(thread, "_target", None)
    return getattr(target, "__module__", "") == "concurrent.futures.thread"


def where_raised(error: BaseException) -> str:
    """`` (raised in FILE:LINE in FUNCTION)``: the innermost frame of ``error``'s traceback in
    the user's own code (a task module's ``loss_fn``, say), that is in a file outside the
    ``hgrn_jax`` and ``experiments`` packages, Python's library and the installed packages
    (JAX's checks name no caller: ``indices and arr must have the same number of
    dimensions``); "" when every frame is in those."""
    import sysconfig

    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    not_users = {os.path.join(root, "hgrn_jax"), os.path.join(root, "experiments")}
    library = ("stdlib", "platstdlib", "purelib", "platlib")
    not_users |= {os.path.realpath(sysconfig.get_paths()[name]) for name in library}
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.realpath(frame.filename)
        parts = path.split(os.sep)
        if (
            frame.filename.startswith("<")
            or "site-packages" in parts
            or "dist-packages" in parts
            or any(path.startswith(folder + os.sep) for folder in not_users)
        ):
            continue
        return f" (raised in {frame.filename}:{frame.lineno} in {frame.name})"
    return ""


def warning_line(message: Warning | str, category: type[Warning]) -> str:
    """``warning: <Category>: <message on one line>`` (in a pod, the processes other than 0
    prefix it with ``[process N]``: :func:`hgrn_jax.training.podlog.quiet_secondary_processes`
    writes this format behind its prefix)."""
    return f"warning: {category.__name__}: {one_line(str(message))}"


def show_warnings_on_one_line() -> None:
    """Make Python show each warning as one :func:`warning_line` on stderr instead of its
    two-line ``file:line: Category: message`` and the source line: the command-line tools call
    this as they start (the library leaves Python's format alone)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        del filename, lineno, line
        stream = file if file is not None else sys.stderr
        if stream is None:  # pythonw: nowhere to write
            return
        try:
            stream.write(warning_line(message, category) + "\n")
            stream.flush()
        except OSError:  # a closed or broken stderr
            pass

    def format_warning(message, category, filename, lineno, line=None) -> str:
        del filename, lineno, line
        return warning_line(message, category) + "\n"

    warnings.showwarning = show
    warnings.formatwarning = format_warning


def check_config_file(path: str | None = None) -> None:
    """Stop with one line when the --config file (``path``, default the parsed flag's) does
    not exist."""
    if path is None:
        path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    if not os.path.isfile(path):
        fail(
            f"config file {path} not found (--config={path}); pass "
            "--config=path/to/config.py[:PRESET], e.g. experiments/configs/lra/listops.py:tiny",
            EXIT_USAGE,
        )


RUN_CONFIG_KEYS = ("task", "data", "model", "batch_size", "num_train_steps")
"""Top-level keys a run cannot do without (the shipped configs hold them all)."""


def config_shape_error(
    config: Any, path: str, keys: tuple[str, ...] = RUN_CONFIG_KEYS
) -> str | None:
    """The one-line error for a config file whose ``get_config`` returned something else than
    an ``ml_collections.ConfigDict`` (a dict was ``AttributeError: 'dict' object has no
    attribute 'task'``) or a config without one of ``keys`` (``AttributeError: "'data'"``,
    naming neither the file nor the key); None for a usable one."""
    start = (
        "start from a shipped config (e.g. experiments/configs/lra/listops.py) and change it, "
        "as docs/tasks.md does"
    )
    if not isinstance(config, ml_collections.ConfigDict):
        return (
            f"config file {path}: get_config returned a {type(config).__name__}, not an "
            f"ml_collections.ConfigDict; return one ({start})"
        )
    missing = [key for key in keys if key not in config]
    if missing:
        return (
            f"config file {path}: the config has no {', '.join(map(repr, missing))}; "
            f"a run needs {', '.join(keys)} ({start})"
        )
    return None


def unread_override(overrides: Mapping[str, Any]) -> str | None:
    """The one-line error for a ``--config.key=value`` override that the run would not read, or
    None. ``overrides`` maps each overridden key to its value (``config_flags``'s
    ``get_override_values``). ``epochs`` is one: a config file derives ``num_train_steps`` (and
    its schedule and evaluation steps) from its epochs when it loads, and the runner counts
    ``num_train_steps``, so ``--config.epochs`` alone trained the file's number of steps."""
    if "epochs" in overrides and "num_train_steps" not in overrides:
        return (
            f"--config.epochs={overrides['epochs']} does not change the run: the runner counts "
            "config.num_train_steps, which the config file derived from its own epochs as it "
            "loaded; set --config.num_train_steps (epochs x steps per epoch), and "
            "--config.schedule.decay_steps and --config.eval_every if they should follow"
        )
    return None


def check_overrides() -> None:
    """Stop with one line when a ``--config.*`` override is one the run would not read
    (:func:`unread_override`)."""
    message = unread_override(config_flags.get_override_values(flags.FLAGS["config"]))
    if message is not None:
        fail(message, EXIT_USAGE)


def _task_name(config: Any) -> str:
    """The task's name as the run's log gives it: a ``module:DATASET`` task's dataset name (the
    module is imported by then: the run checked the task), else ``config.task``."""
    from hgrn_jax.training.task_choice import dataset_entry

    try:
        entry = dataset_entry(config)
    except ValueError:  # the run says so itself
        entry = None
    return entry.name if entry is not None else str(config.task)


def quote_the_runs_paper_number(config: Any, overrides: Mapping[str, Any]) -> str | None:
    """Make ``config.paper`` (which results.json and the final line quote) belong to the run's
    own task and model (``model.mixer.kind``), whichever way the config came to differ from the
    file it was copied from (a config file, ``--config.task``, ``--config.model.mixer.kind``).
    For a task of the papers (:data:`experiments.papers.PAPER_TASKS`) the numbers become the
    papers' (:func:`experiments.papers.paper_of`), or 0 (none) where no paper has that run;
    for another task, numbers that the config marks (``paper.task``, ``paper.mixer``) as of
    another run become 0, and unmarked ones (the user's) stay. ``--config.paper.value`` (in
    ``overrides``: ``get_override_values``) is left as given. The marks become the run's: the
    numbers are now its own (:func:`hgrn_jax.training.task_choice.quoted_paper_number`). Returns the one-line note saying
    what changed and why, or None when nothing did."""
    from experiments.papers import PAPER_TASKS, lm_setting, paper_of
    from hgrn_jax.training.workdir import mixer_kind

    paper = config.get("paper", None) if hasattr(config, "get") else None
    if not hasattr(paper, "get"):
        return None
    task, kind = str(config.task), mixer_kind(config)
    quoted = paper.get("value", 0)
    origin = (paper.get("task", task), paper.get("mixer", kind))
    for key, value in (("task", task), ("mixer", kind)):
        if key in paper:  # the numbers are now this run's (results.json checks the marks)
            paper[key] = value
    if "paper.value" in overrides:
        return None
    model = config.get("model", None)
    features = model.get("features", None) if hasattr(model, "get") else None
    data = config.get("data", None)
    source = data.get("source", None) if hasattr(data, "get") else None
    lm = lm_setting(kind, source, config)
    if task in PAPER_TASKS:
        right = paper_of(task, kind, features, lm) or {}
    elif origin != (task, kind):
        right = {}
    else:
        return None
    if right.get("value", 0) == quoted:
        return None
    for key in ("value", "val_value", "num_params"):
        if key in paper:
            paper[key] = type(paper[key])(right.get(key, 0))
    setting = {
        "imagenet": f" at width {features}",
        "wikitext103": f" with {lm[1]} layers, d {lm[2]}, {lm[3]} vocabulary",
    }.get(task, "")
    if task == "wikitext103" and lm[3] == "bytes":
        setting += " (per-byte perplexity: not comparable)"
    run = f"the {kind} model on task {_task_name(config)!r}{setting}"
    if right:
        return (
            f"note: results.json quotes {right['value']}, the paper's number for {run}, not "
            f"config.paper.value={quoted} (another run's)"
        )
    return (
        f"note: results.json quotes no paper number: no paper reports {run} "
        f"(config.paper.value={quoted} is another run's); set --config.paper.value to quote one"
    )


def quote_the_right_paper_number() -> None:
    """:func:`quote_the_runs_paper_number` for the parsed ``--config``, printing its note."""
    flag = flags.FLAGS["config"]
    note = quote_the_runs_paper_number(flag.value, config_flags.get_override_values(flag))
    if note is not None:
        print(note, file=sys.stderr, flush=True)


def _parse_config_file(arg: str) -> Any:
    """The config of ``--config=<arg>`` (``path.py[:PRESET]``) as the file gives it, without
    the command line's overrides."""
    return config_flags.config_flags.ConfigFileFlagParser("config").parse(arg)


def _config_arg(argv: list[str]) -> str | None:
    """The ``--config`` value of ``argv`` (``path.py[:PRESET]``), if there is one."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.partition("=")[2]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def config_file_error(error: BaseException, argv: list[str]) -> str | None:
    """``error`` as one line naming the ``--config`` file of ``argv`` (and its line) when the
    file itself is at fault: it defines no ``get_config``, its ``get_config`` takes no preset,
    or importing it or running its ``get_config`` raised; None otherwise."""
    arg = _config_arg(argv)
    if arg is None:
        return None
    path, _, preset = arg.partition(":")
    target = os.path.realpath(path)
    inner: BaseException = error  # ml_collections raises AttributeError(KeyError(text))
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    first = inner.args[0] if inner.args else None
    text = one_line(first if isinstance(first, str) else str(inner))
    # ml_collections lists every field of the section; its suggestion, if any, is what helps.
    text = re.sub(r'\s*Other fields present: ".*"(?=; Did you mean|$)', "", text)
    module_file = getattr(getattr(error, "obj", None), "__file__", None) or ""
    if getattr(error, "name", None) == "get_config" and os.path.realpath(module_file) == target:
        return (
            f"config file {path} defines no get_config; add get_config(preset=None) returning "
            "its ConfigDict (as experiments/configs/lra/listops.py does)"
        )
    if isinstance(error, TypeError) and text.startswith("get_config()"):
        return (
            f"config file {path}: {text}; define get_config(preset=None) so that "
            f"--config={arg} can pass it the preset {preset!r}"
        )
    if isinstance(error, SyntaxError) and os.path.realpath(error.filename or "") == target:
        line = error.lineno
    else:
        frames = traceback.extract_tb(error.__traceback__)
        lines = [f.lineno for f in frames if os.path.realpath(f.filename) == target]
        if not lines:
            return None
        line = lines[-1]
    if "cannot be added since the config is locked" in text:  # a preset's locked config
        text += " Add new keys inside `with config.unlocked():` (docs/tasks.md)"
    return f"config file {path}, line {line}: {type(error).__name__}: {text}; fix the file"


def unknown_key(config: Any, key: str) -> str | None:
    """The one-line error for ``--config.<key>`` when ``config`` has no such key, naming the
    first missing part, with the close names of its section (``difflib``) or, when none is
    close, all of them; None when ``config`` has the key."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        section = ".".join(["config", *parts[:i]])
        if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not hasattr(node, "keys"):
            return (
                f"unknown config key --config.{key}: {section} is a value ({node!r}), not a "
                f"section; set --config.{'.'.join(parts[:i])}=VALUE"
            )
        names = sorted(str(name) for name in node.keys())
        if part in names:
            node = node[part]
            continue
        close = difflib.get_close_matches(part, names, n=3)
        if close:
            hint = "did you mean " + " or ".join(repr(name) for name in close) + "?"
        else:
            hint = f"its keys are {', '.join(names)}" if names else "it has no keys"
        return f"unknown config key --config.{key}: {section} has no {part!r}; {hint}"
    return None


def _unknown_override(argv: list[str]) -> str | None:
    """:func:`unknown_key` of the first ``--config.*`` override of ``argv`` that the loaded
    config lacks, or None (no config loaded, or every key known)."""
    try:
        config = flags.FLAGS["config"].value
    except (KeyError, AttributeError):
        return None
    arg = _config_arg(argv)
    if config is None and arg is not None:  # the override failed as the file loaded: again
        try:
            config = _parse_config_file(arg)
        except Exception:  # the file's own error is reported as it is
            return None
    if not hasattr(config, "keys"):
        return None
    for arg in argv[1:]:
        if arg.startswith("--config."):
            message = unknown_key(config, arg.partition("=")[0][len("--config.") :])
            if message is not None:
                return message
    return None


def _fail_on_file_error_or_unknown_key(error: BaseException | None, argv: list[str]) -> None:
    """Stop with one line when ``error`` is the config file's own (:func:`config_file_error`)
    or an override names a key the config lacks (:func:`unknown_key`); else return."""
    message = config_file_error(error, argv) if error is not None else None
    message = message or _unknown_override(argv)
    if message is not None:
        fail(message, EXIT_USAGE)


_NOT_A = {
    "invalid literal for int()": "a whole number",
    "could not convert string to float": "a number",
}


def _typed_value_hint(text: str, argv: list[str]) -> str:
    """absl's ``flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'``
    with what the key takes said plainly: ``... must be a whole number, as the config file's
    value is``; its ``Flag --x must have a value other than None`` as ``--x is required`` when
    ``argv`` lacks it, and for a ``--config`` given, as its file's ``get_config`` returning
    None."""
    missing = re.match(r"flag (--\w+)=None: Flag --\w+ must have a value other than None", text)
    if missing:
        flag = missing.group(1)
        given = [a for a in argv[1:] if a == flag or a.startswith(flag + "=")]
        if not given:
            return f"{flag} is required: pass {flag}=..."
        if flag == "--config":
            path = (_config_arg(argv) or "").partition(":")[0]
            return f"config file {path}: get_config returned None (no `return config` at its end?)"
    for python_says, wanted in _NOT_A.items():
        if python_says in text and text.startswith("flag --config."):
            flag = text.split(": ", 1)[0].removeprefix("flag ")
            return (
                f"{flag}: {flag.split('=', 1)[0]} must be {wanted}, as the config file's value is"
            )
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config-override errors as one line naming the key and errors
    of the config file itself as one line naming the file (:func:`config_file_error`)."""
    config_arg = _config_arg(argv)
    if config_arg is not None:  # a --config.key override would load a missing file first
        check_config_file(config_arg.partition(":")[0])
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        # absl re-raises a TypeError or ValueError of the config file as a flags.Error (and
        # ml_collections wraps it once more): the first one raised says what went wrong.
        first = error.__context__
        while first is not None and first.__context__ is not None:
            first = first.__context__
        _fail_on_file_error_or_unknown_key(first if isinstance(first, TypeError) else None, argv)
        text = str(error)
        # A config file's own error (e.g. an unknown preset) is the useful part of absl's text.
        cause = next(
            (line.strip() for line in reversed(text.splitlines()) if "Error: " in line), None
        )
        hint = _typed_value_hint(cause or text, argv)
        fail(f"{hint} (pass --helpshort to see the flags)", EXIT_USAGE)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        _fail_on_file_error_or_unknown_key(error, argv)
        # ml_collections reports an unknown --config.key as an AttributeError/KeyError whose
        # text is the quoted key, sometimes with a suggestion; make it one readable line.
        text = str(error.args[0] if error.args else error)
        text = " ".join(text.replace("\\n", "\n").split()).replace("\\'", "").replace("'", "")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        key = text.split()[0].strip('"') if text else ""
        text = text.strip('"')
        culprit = next((o for o in overrides if key and o.endswith("." + key)), None)
        culprit = culprit or next((o for o in overrides if key and key in o), "--config.?")
        if isinstance(error, (AttributeError, KeyError)):
            fail(
                f"unknown config key {culprit} ({text}); the keys are those of the config "
                "file (a previous run's config.json lists them)",
                EXIT_USAGE,
            )
        fail(f"bad value for {culprit}: {text}", EXIT_USAGE)
    except Exception as error:  # e.g. an ImportError or SyntaxError of the config file
        file_error = config_file_error(error, argv)
        if file_error is None:
            raise
        fail(file_error, EXIT_USAGE)
    return []


def final_line(results: dict[str, Any]) -> str:
    """The run's last line, from its results.json fields: the task, the best validation and
    the test metric, the paper's number (left out where there is none), steps and time."""
    metric = results["metric"]
    paper = f" (paper {results['paper']})" if results["paper"] else ""
    return (
        f"{results['task']}: best val {metric} {results['best_val']:.4f}, "
        f"test {metric} {results['test']:.4f}{paper}, "
        f"{results['steps']} steps, {results['wall_time_s']:.1f} s"
    )
