"""A finished (or running) run's model, back as a Flax module: :func:`load_trained_model`.

Reads the run folder only: ``config.json`` (the model is built from it, without the data) and one
step folder of ``checkpoints/``, whose checksums (:mod:`hgrn_jax.training.integrity`) are
verified when it has them. Nothing is locked, written, moved or quarantined, so a run that is
still training can be loaded (its newest checkpoint once Orbax has committed it).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import time
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from hgrn_jax.training import integrity
from hgrn_jax.training.checkpoint import (
    LATE_CALLBACK,
    CheckpointUnverifiedWarning,
    Echoes,
    array_shapes,
    best_of,
    error_chain,
)
from hgrn_jax.training.state import (
    abstract_checkpoint_tree,
    is_prng_key,
    merge_model,
    split_model,
)
from hgrn_jax.training.workdir import checkpoint_steps, lock_state, readable_run_config

CHECKPOINT_CHOICES = ("best", "latest")

_ATTEMPTS = 5
"""Loads of 'best' / 'latest' tried while a training run deletes the checkpoint being read."""

_DELETION_WAIT_S = 2.0
"""How long a load that moved on from a step it failed to read waits for that step's folder
to go (the run deleting it) before taking the failure for a checkpoint's own and showing its
errors."""

_VOCAB_PROBE = 1_000_003
"""A vocabulary size no other axis of a model has: the axes of this size are the vocabulary's."""


def _saved_metrics(step_folder: Path) -> dict[str, float]:
    """The validation metric Orbax stored with a checkpoint (``{}`` for one saved without)."""
    path = step_folder / "metrics" / "metrics"
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def best_step(workdir: str | Path) -> int | None:
    """The checkpoint the run ranks best by its validation metric (``val_accuracy``: highest;
    ``val_perplexity``: lowest; ties: the later step), as the runner picks the one it tests
    (:meth:`hgrn_jax.training.checkpoint.Checkpoints.best_step`, the ``best_step`` of
    ``results.json``); None before the first evaluation."""
    saved = {
        step: _saved_metrics(Path(workdir) / "checkpoints" / str(step))
        for step in checkpoint_steps(workdir)
    }
    for metric, mode in (("val_accuracy", "max"), ("val_perplexity", "min")):
        numbers = {
            step: {metric: float(m[metric])}
            for step, m in saved.items()
            if isinstance(m.get(metric), (int, float))
        }
        if (best := best_of(numbers, metric, mode)) is not None:
            return best
    return None


def _choose_step(workdir: Path, checkpoint: str | int) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"{workdir / 'checkpoints'} holds no checkpoint yet; wait for the run's first "
            "checkpoint (config.checkpoint_every / eval_every steps) or train it longer"
        )
    listed = ", ".join(map(str, steps))
    if checkpoint == "latest":
        return steps[-1]
    if checkpoint == "best":
        best = best_step(workdir)
        if best is None:
            raise ValueError(
                f"{workdir / 'checkpoints'} has no checkpoint with a validation metric yet (steps "
                f"{listed}); pass checkpoint='latest' or a step, or wait for an evaluation"
            )
        return best
    if isinstance(checkpoint, str) and checkpoint.isdigit():
        checkpoint = int(checkpoint)
    if not isinstance(checkpoint, int) or isinstance(checkpoint, bool):
        raise ValueError(
            f"checkpoint={checkpoint!r} is not 'best', 'latest' or a step; pass one of those "
            f"(steps in {workdir / 'checkpoints'}: {listed})"
        )
    if checkpoint not in steps:
        raise ValueError(
            f"{workdir / 'checkpoints'} has no checkpoint at step {checkpoint}; pass one of the "
            f"steps there: {listed} (or 'best' / 'latest')"
        )
    return checkpoint


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``"params/embed/embedding/value" -> shape`` of every array leaf of ``tree``."""
    return {name: shape for name, (shape, _) in array_shapes(tree).items()}


def _model_builder(
    workdir: Path, config: ml_collections.ConfigDict, stored: dict[str, tuple[int, ...]]
) -> Callable[[nnx.Rngs], nnx.Module]:
    """``build(rngs) -> nnx.Module`` as the run built its model, from ``config`` alone for a
    task of the registry (a vocabulary the config leaves to the data is read off the stored
    arrays); a task of the user's own is made by its factory."""
    from hgrn_jax.tasks import model_settings, registry
    from hgrn_jax.tasks.array_task import ArrayTask
    from hgrn_jax.tasks.dataset_entry import Dataset
    from hgrn_jax.tasks.prepared_tfds import ReleaseOrPrepared
    from hgrn_jax.training.task_choice import task_factory

    try:
        factory = task_factory(config)
    except ValueError as error:
        raise ValueError(f"{workdir / 'config.json'}: {error}") from None
    if factory is not None and not isinstance(factory, Dataset):
        task = factory(config)  # a task of the user's own may need its data to build a model
        return task.build_model
    entry = factory if factory is not None else registry.dataset(config)
    source = entry.source(config)
    # A release read from its files or its prepared tfds data is one of two classes.
    classes = (
        (source.files, source.prepared) if isinstance(source, ReleaseOrPrepared) else (source,)
    )
    if any(isinstance(c, type) and c.build_model is not ArrayTask.build_model for c in classes):
        # A source of the user's own with its own model: the run trained that model.
        return entry.task(config).build_model
    model_settings.check_model_sizes(config.model, model_settings.SIZES_FROM_THE_DATA)
    derived = entry.derive(config)
    _run_unsplit(derived.model)
    has_vocabulary = any(f.name == "vocab_size" for f in dataclasses.fields(entry.model.config_cls))
    # A linear encoder (pixels) has no vocabulary to find, whatever its config class allows.
    embeds = derived.model.get("encoder", "embed") == "embed"
    if has_vocabulary and embeds and not derived.model.get("vocab_size", 0):
        # Settled from the data files (a tokenizer, prepared data) when the run started; the
        # checkpoint's arrays hold it.
        derived.model.vocab_size = _VOCAB_PROBE
        # Not nnx.eval_shape: under a set mesh it reads the logical axis names as mesh axes.
        probe = _shapes(
            jax.eval_shape(
                lambda: split_model(model_settings.build_model(derived, entry.model, nnx.Rngs(0)))
            )[1]
        )
        sizes = {
            stored.get("params/" + name, ())[axis]
            for name, shape in probe.items()
            for axis, n in enumerate(shape)
            if n == _VOCAB_PROBE and len(stored.get("params/" + name, ())) > axis
        }
        if len(sizes) != 1:
            raise ValueError(
                f"{workdir / 'config.json'} leaves model.vocab_size to the data (0) and the "
                "checkpoint's arrays do not say it; set model.vocab_size in that file to the "
                "run's vocabulary size"
            )
        derived.model.vocab_size = sizes.pop()
    return lambda rngs: model_settings.build_model(derived, entry.model, rngs)


def _run_unsplit(model: ml_collections.ConfigDict) -> None:
    """Drop ``sequence_axis`` (sequence parallelism, which changes no parameter) from a model
    config: the loaded model runs on the default device, where a call of a run trained with
    ``model.mixer.sequence_axis=model`` asked for a mesh with that axis."""
    for where in (model, model.get("mixer")):
        if where is not None and where.get("sequence_axis") is not None:
            where["sequence_axis"] = None


def _other_steps_hint(workdir: Path, step: int) -> str:
    others = [s for s in checkpoint_steps(workdir) if s != step]
    how = (
        f"load another of its steps ({', '.join(map(str, others))}) with checkpoint=STEP"
        if others
        else "train again"
    )
    return f"{how}, or put back the folder from a copy"


def _unrestorable(workdir: Path, step: int, error: Exception) -> ValueError:
    text = " ".join(str(error).split())[:300]  # TensorStore's messages span lines
    return ValueError(
        f"checkpoint {workdir / 'checkpoints' / str(step)} does not restore "
        f"({type(error).__name__}: {text}); {_other_steps_hint(workdir, step)}"
    )


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's ``config.json`` as a ConfigDict; FileNotFoundError when ``workdir`` is not a
    run folder, ValueError when the file holds no config."""
    path = Path(workdir) / "config.json"
    source, saved, problem = readable_run_config(workdir)
    if saved is not None:
        if problem:
            warnings.warn(
                f"{path} {problem}; using the copy of the run's config in {source} (running "
                "the run's training command again rebuilds config.json from it)",
                RuntimeWarning,
                stacklevel=3,  # the caller of load_trained_model
            )
        return ml_collections.ConfigDict(saved)
    if problem == "not found":
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a run folder; pass the --workdir of an "
            "experiments.train run (it holds config.json and checkpoints/)"
        )
    raise ValueError(f"{path} {problem}; put back the config.json the run wrote")


def load_trained_model(
    workdir: str | Path, checkpoint: str | int = "best", *, return_step: bool = False
) -> (
    tuple[nnx.Module, ml_collections.ConfigDict] | tuple[nnx.Module, ml_collections.ConfigDict, int]
):
    """The model of run folder ``workdir`` at one of its checkpoints, and the run's config
    (and, with ``return_step``, the step of the checkpoint loaded: which one ``"best"`` or
    ``"latest"`` named).

    ``checkpoint``: ``"best"`` (the checkpoint with the best validation metric, the one the
    run tested: ``results.json``'s ``best_step``), ``"latest"`` or a step (an int, or its
    digits). The model is built from ``config.json`` as the run built it (same model family,
    sizes, ``config.dtype`` activations, float32 parameters), without reading the data, and
    given the checkpoint's parameters and other model variables (BatchNorm statistics, dropout
    RNG streams); the optimizer state is not read. (A task of the user's own,
    ``config.task="module:factory"``, builds its model through ``factory(config)``, which may
    read its data; its module must be importable.) Arrays are plain ones on the default device,
    whatever mesh the run was sharded over. The model is in eval mode (no dropout, BatchNorm on
    its running statistics): an :class:`~hgrn_jax.nn.HGRNLM` maps ids (B, T) to logits
    (B, T, vocab) and goes to :func:`hgrn_jax.nn.generate`; a classifier maps inputs (B, L) and
    mask (B, L) to logits (B, classes).

    The checkpoint's files are checked against their recorded SHA-256 checksums (a
    :class:`~hgrn_jax.training.checkpoint.CheckpointUnverifiedWarning` when it has none). The
    run folder is only read; while the run still trains, ``"best"`` and ``"latest"`` load the
    one the run has then, a step the run deletes meanwhile is read again from the new one (up
    to five times), and what Orbax, TensorStore and asyncio print of the read that failed is
    left out (:class:`_Reads`); what they print of a checkpoint still there is shown.
    Errors (one line naming the path or value and the fix):
    FileNotFoundError for a folder without ``config.json`` or without checkpoints; ValueError
    for an unknown step (the steps there are listed), ``"best"`` before any evaluation, a
    failed checksum, a ``config.task`` of the user's own that cannot be imported, or a run
    that deleted each checkpoint read, five times in a row (or a step asked for by number).
    """
    workdir = Path(workdir).absolute()  # Orbax reads absolute paths only
    config = read_config(workdir)
    reads = _Reads()
    echoes = Echoes(reads.named, conclusive=False)
    echoes.install()
    succeeded = False
    try:
        found = _load_choice(workdir, config, checkpoint, reads)
        succeeded = True
        return found if return_step else found[:2]
    finally:
        reads.finish(succeeded)
        if len(reads.folders) > 1 or not succeeded:
            # A failed read's coroutines and futures report their errors when collected, and
            # the echoes held refer to some of them.
            echoes.release(reads.explained)
            gc.collect()
        echoes.uninstall()
        echoes.release(reads.explained)


class _Reads:
    """The step folders one :func:`load_trained_model` read, and which of them a run still
    training deleted meanwhile: the errors Orbax, TensorStore and asyncio print of such a read
    (hundreds of lines of tracebacks for a tiny model; the load reads the run's next checkpoint
    instead) are echoes to leave out (:class:`~hgrn_jax.training.checkpoint.Echoes`)."""

    def __init__(self):
        self.folders: list[Path] = []
        self.retried: set[Path] = set()  # gone, or still there but 'best' / 'latest' moved on
        self.gone: set[Path] = set()  # set by finish: the folders whose echoes are explained
        self.explains_late_callbacks = False

    def named(self, error: BaseException | None, text: str) -> Path | None:
        """The folder read whose path the echo ``text`` or ``error`` (or one it was raised
        from) names, or None."""
        texts = [text, *(str(e) for e in error_chain(error))]
        for folder in self.folders:
            path = re.compile(re.escape(str(folder)) + r"(?![\w-]|\.\w)")  # not 40/, 4.tmp/
            if any(path.search(t) for t in texts):
                return folder
        return None

    def finish(self, succeeded: bool) -> None:
        """The load is over: the echoes of a read it moved on from are explained when that step
        folder is gone (after a successful load, once the run has had
        :data:`_DELETION_WAIT_S` to finish deleting it: a step still there failed to read on
        its own, damaged, and its errors are shown); asyncio's late callbacks, which name no
        folder, when every read but a successful last one is explained."""
        deadline = time.monotonic() + _DELETION_WAIT_S
        while succeeded and any(f.is_dir() for f in self.retried):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.gone = {f for f in self.retried if not f.is_dir()}
        rest = set(self.folders[:-1] if succeeded else self.folders) - self.gone
        self.explains_late_callbacks = bool(self.gone) and not rest

    def explained(self, what: Hashable) -> bool:
        if what == LATE_CALLBACK:
            return self.explains_late_callbacks
        return what in self.gone


def _load_choice(
    workdir: Path, config: ml_collections.ConfigDict, checkpoint: str | int, reads: _Reads
) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
    """:func:`load_trained_model`'s ``(model, config, step)``, each step folder read recorded
    in ``reads``."""
    for attempt in range(_ATTEMPTS):
        step = _choose_step(workdir, checkpoint)
        folder = workdir / "checkpoints" / str(step)
        reads.folders.append(folder)
        try:
            return _load_step(workdir, config, step), config, step
        except ValueError as error:
            # Its context, not shown (raised from None), holds the failed read's coroutines,
            # whose errors are echoes: they go now, not when the caller drops this error.
            error.__context__ = None
            # A run still training deletes its older checkpoints (and a former best) as it
            # saves new ones; one may go while it is read. 'best' / 'latest' then name another.
            if folder.is_dir() and (
                checkpoint not in CHECKPOINT_CHOICES or _choose_step(workdir, checkpoint) == step
            ):
                raise
            reads.retried.add(folder)
            if checkpoint not in CHECKPOINT_CHOICES:
                raise ValueError(
                    f"checkpoint {folder} was deleted while it was read (a run still training "
                    "keeps only its newest checkpoints and its best); pass "
                    "checkpoint='latest' or 'best', or one of the steps there: "
                    f"{', '.join(map(str, checkpoint_steps(workdir)))}"
                ) from None
            if attempt == _ATTEMPTS - 1:
                tried = ", ".join(f.name for f in reads.folders)
                raise ValueError(
                    f"run {workdir} is still training and deleted the checkpoint "
                    f"{checkpoint!r} named each time it was read ({_ATTEMPTS} tries: steps "
                    f"{tried}); load it again, or once the run has finished (a run with a "
                    "larger config.checkpoint_every or keep_checkpoints keeps each one longer)"
                ) from None
    raise AssertionError("unreachable")


def _load_step(workdir: Path, config: ml_collections.ConfigDict, step: int) -> nnx.Module:
    """The model at checkpoint ``step`` of ``workdir`` (see :func:`load_trained_model`)."""
    folder = workdir / "checkpoints" / str(step)
    try:
        checked = integrity.verify(folder)
    except integrity.CheckpointError as error:
        raise ValueError(
            f"checkpoint {folder} is damaged ({error}); {_other_steps_hint(workdir, step)}"
        ) from None
    if isinstance(checked, integrity.Unverified):
        reason = checked.reason
        if lock_state(workdir)[0] == "live":  # the newest step's, written after its commit
            reason = f"{folder} has no {integrity.MANIFEST} yet: its run, still training, writes it"
        warnings.warn(
            f"checkpoint at step {step}: {reason}; loading it unverified",
            CheckpointUnverifiedWarning,
            stacklevel=3,
        )
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(folder / "state")
    except Exception as error:  # Orbax and TensorStore raise many kinds
        raise _unrestorable(workdir, step, error) from None
    stored = _shapes(getattr(metadata, "tree", metadata))
    build = _model_builder(workdir, config, stored)
    graphdef, params, model_state = jax.eval_shape(lambda: split_model(build(nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    wanted = {"params": params, "model_state": model_state}
    abstract = abstract_checkpoint_tree(wanted, jax.tree.map(lambda _: device, wanted))
    have, want = _shapes(abstract), {k: v for k, v in stored.items() if k.split("/")[0] in wanted}
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:3]
        raise ValueError(
            f"checkpoint {folder} holds other arrays than the model config.json describes "
            f"(e.g. {diff}); load it with the config it was saved with"
        )
    try:
        restored = handler.restore(
            folder / "state",
            args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True,
            ),
        )
    except Exception as error:
        raise _unrestorable(workdir, step, error) from None
    # The abstract model's keys carry no implementation to copy (from_checkpoint_tree's way);
    # nnx.Rngs makes keys of JAX's default one, which wrap_key_data uses.
    restored = jax.tree.map(
        lambda x, ref: jax.random.wrap_key_data(x) if is_prng_key(ref) else x, restored, wanted
    )
    model = merge_model(graphdef, restored["params"], restored["model_state"])
    model.eval()
    return model
