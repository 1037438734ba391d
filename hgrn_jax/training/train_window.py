"""The training steps since the last ``train`` record, which that record averages.

Each step's metrics stay on the device until a record is written (one transfer per record, not
per step). A checkpoint between records keeps the window's per-step loss and accuracy counts in
its JSON ``meta``, so that a resumed run's next record averages the same steps, with the same
float32 values, as an uninterrupted run's; before, the steps between the last record and a
preemption were dropped from it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from hgrn_jax.training.integrity import CheckpointError

#: The per-step metrics a record sums or averages over its window; the rest (learning rate,
#: gradient norm, loss scale) are the window's last step's.
WINDOW_KEYS = ("loss", "correct", "weight")
META_KEY = "train_window"


class TrainWindow:
    """Per-step metrics since the last record (device arrays, or host values after a resume)."""

    def __init__(self, restored: list[dict[str, Any]] | None = None):
        self.steps: list[dict[str, Any]] = list(restored or [])

    def add(self, metrics: dict[str, Any]) -> None:
        self.steps.append(metrics)

    def record(self, with_accuracy: bool) -> dict[str, float]:
        """The train record of the window (``loss``, ``lr``, ``grad_norm``, and ``loss_scale``
        and ``accuracy`` in percent where the steps have them), which empties it. The window
        holds at least one step of this process's run, whose metrics are the last."""
        host = jax.device_get(self.steps)
        self.steps = []
        last = host[-1]
        record = {
            "loss": float(np.mean([m["loss"] for m in host])),
            "lr": float(last["lr"]),
            "grad_norm": float(last["grad_norm"]),
        }
        if "loss_scale" in last:
            record["loss_scale"] = float(last["loss_scale"])
        if with_accuracy and "correct" in last:
            weight = sum(float(m["weight"]) for m in host)
            record["accuracy"] = 100.0 * sum(float(m["correct"]) for m in host) / max(weight, 1e-9)
        return record

    def to_meta(self) -> dict[str, Any]:
        """The window as JSON for a checkpoint's meta: ``{"train_window": {"dtypes": {key:
        dtype}, "steps": [{key: value}, ...]}}``, or ``{}`` when it is empty."""
        if not self.steps:
            return {}
        host = jax.device_get([{k: m[k] for k in WINDOW_KEYS if k in m} for m in self.steps])
        dtypes = {k: str(np.asarray(v).dtype) for k, v in host[-1].items()}
        steps = [{k: np.asarray(v).item() for k, v in m.items()} for m in host]
        return {META_KEY: {"dtypes": dtypes, "steps": steps}}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: str) -> TrainWindow:
        """The window a checkpoint's ``meta`` holds (empty for one saved at a record, or by
        code from before windows were kept), each value back in its dtype, so that the next
        record averages exactly the numbers an uninterrupted run would. ``where`` (the
        checkpoint's folder) is named in the :class:`CheckpointError` for a malformed entry."""
        saved = meta.get(META_KEY)
        if saved is None:
            return cls()
        try:
            dtypes = {k: np.dtype(v) for k, v in saved["dtypes"].items()}
            steps = [{k: np.asarray(m[k], dtypes[k]) for k in dtypes} for m in saved["steps"]]
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(
                f"{where}: its meta's {META_KEY!r} is malformed ({error!r}; written as "
                '{"dtypes": {name: dtype}, "steps": [{name: number}, ...]}); move the checkpoint '
                "aside and run again to resume from the one before"
            ) from None
        return cls(steps)
