"""Orbax checkpoints of a run: asynchronous saves, the latest N and the best kept, safe resume.

Each checkpoint is a step folder with two items: ``state`` (the train state's arrays, restored
directly into their shardings) and ``meta`` (JSON: the next step, i.e. the data position, and
run bookkeeping). Checkpoints saved after an evaluation carry the validation metric, and the one
with the best value is kept besides the latest ``keep`` ones.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def _drop_untracked_metric_notice(record: logging.LogRecord) -> bool:
    # Orbax warns on every save without metrics once a metric is tracked; ours are deliberate
    # (periodic checkpoints between evaluations).
    return not str(record.msg).startswith("Requested `tracked_metric`")


logging.getLogger("absl").addFilter(_drop_untracked_metric_notice)


class CheckpointFallbackWarning(RuntimeWarning):
    """A checkpoint could not be read and an older one is used instead."""


class Checkpoints:
    """A run's checkpoint folder.

    Args:
      directory: the folder (created if absent).
      keep: how many of the latest checkpoints to keep.
      best_metric: the metrics key that ranks checkpoints (e.g. ``"val_accuracy"``); the best
        checkpoint is kept in addition to the latest ``keep``.
      best_mode: ``"max"`` or ``"min"`` (for perplexity).
      async_save: write in a background thread (the arrays are copied off the devices first,
        so training continues at once and may donate the state's buffers).
    """

    def __init__(self, directory: str | Path, *, keep: int = 2, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', not {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        keep_policies: list[Any] = [policies.LatestN(n=max(int(keep), 1))]
        if best_metric is not None:
            keep_policies.append(policies.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax store the metrics with each checkpoint; what is kept is
            # decided by the preservation policy alone.
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                             options=options)

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, tree: Any, meta: dict, metrics: dict[str, float] | None = None
             ) -> None:
        """Start saving ``tree`` (arrays) and ``meta`` (JSON) as checkpoint ``step``."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Checkpoint ``step`` as ``(tree, meta)``; ``target`` gives shapes, dtypes, shardings."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, dict(restored.meta)

    def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
        """The newest readable checkpoint as ``(step, tree, meta)``, or None if there is none.

        A checkpoint that fails to load (half-written, truncated or corrupt files) is reported
        with a :class:`CheckpointFallbackWarning`, deleted (so the step can be saved again), and
        the previous one is tried.
        """
        self.wait()
        for step in reversed(self.all_steps()):
            try:
                tree, meta = self.restore(step, target)
            except Exception as error:  # noqa: BLE001 (any read failure means "unusable")
                warnings.warn(
                    f"checkpoint at step {step} in {self.directory} is unreadable "
                    f"({type(error).__name__}: {str(error)[:300]}); falling back to the "
                    "previous checkpoint", CheckpointFallbackWarning, stacklevel=2)
                self.manager.delete(step)
                continue
            return step, tree, meta
        return None

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with checkpoint ``step`` (None for checkpoints saved without)."""
        metrics = self.manager.metrics(step)
        return dict(metrics) if metrics is not None else None

    def best_step(self) -> int | None:
        """The step whose ``best_metric`` is best, or None. On ties the later step wins, as in
        Orbax's BestN policy, so the step returned is one that was kept."""
        scored = [(step, m[self.best_metric]) for step in self.all_steps()
                  if (m := self.metrics(step)) is not None and self.best_metric in m]
        if not scored:
            return None
        sign = 1.0 if self.best_mode == "max" else -1.0
        return max(scored, key=lambda item: (sign * item[1], item[0]))[0]

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's resources."""
        self.manager.close()
