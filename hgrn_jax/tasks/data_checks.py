"""Checks of a task's loaded data: class labels and token ids of the shape and range the loss and
the model read (one-line errors naming the split and the fix)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def check_labels(
    labels: Any,
    num_classes: int,
    where: str,
    ndim: int = 1,
    refuses_classes: Callable[[int], str] | None = None,
) -> None:
    """ValueError naming ``where`` when class labels are not integers, have other than ``ndim``
    dimensions ((N,): one class per example), or leave ``[0, num_classes)``: the loss compared
    (B,) predictions with (B, 1) labels as a (B, B) table (an accuracy of 3125%), and a label
    truncated from a float, or outside the classes (an all-zero one-hot target, a loss of 0),
    trained on without a word. ``refuses_classes(n)`` names what refuses
    ``config.model.num_classes=n`` (a dataset's ``derive`` that settles the classes; "" when
    nothing does): a label too large then points at the data rather than at the setting."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where} has labels of dtype {labels.dtype} (shape {labels.shape}); class labels "
            "are whole numbers 0 to config.model.num_classes - 1: return them from _load as an "
            "integer array (e.g. np.int32)"
        )
    if labels.ndim != ndim:
        want = (
            "(N,), one class per example (e.g. labels.reshape(-1) for (N, 1))"
            if ndim == 1
            else f"of {ndim} dimensions (the task's label_ndim)"
        )
        raise ValueError(
            f"{where} has labels of shape {labels.shape}; the task's loss takes labels of shape "
            f"{want}: return them so from _load"
        )
    if not labels.size:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(
            f"{where} has a negative class label ({low}); labels run from 0 to "
            "config.model.num_classes - 1: fix the data"
        )
    if high >= num_classes:
        refuser = refuses_classes(high + 1) if refuses_classes is not None else ""
        if refuser:
            raise ValueError(
                f"{where} has class label {high}, outside the {num_classes} classes that "
                f"{refuser} settles as config.model.num_classes (labels 0 to {num_classes - 1}); "
                f"fix the labels of the data, or the classes {refuser} settles"
            )
        raise ValueError(
            f"{where} has class label {high}, outside config.model.num_classes={num_classes} "
            f"(labels 0 to {num_classes - 1}); set --config.model.num_classes={high + 1}"
        )


def check_token_column(column: Any, name: str, where: str) -> None:
    """ValueError naming ``where`` and ``name`` unless ``column`` (an array, or an array-like
    read lazily: judged by its first row) holds integer token ids (N, L): float ids were
    truncated to integers without a word."""
    if isinstance(column, np.ndarray):
        dtype, shape = column.dtype, column.shape
    elif len(column):
        first = np.asarray(column[np.arange(1)])
        dtype, shape = first.dtype, (len(column), *first.shape[1:])
    else:
        return
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"{where}: {name!r} must be integer token ids (examples, length); got {dtype} "
            f"{shape}: return them from _load as an integer array (e.g. np.int32)"
        )
    if len(shape) != 2:
        raise ValueError(
            f"{where}: {name!r} must be token ids of shape (examples, length), 2-D; got "
            f"{len(shape)}-D {shape}: return them from _load so (e.g. ids.reshape(len(ids), -1))"
        )


def check_same_length(columns: Mapping[str, Any], where: str) -> None:
    """ValueError naming ``where`` unless every column (an array or an array-like with
    ``len``) has one row per example: a split whose labels were one short trained, and failed
    only at the first evaluation with an IndexError."""
    lengths = {name: len(column) for name, column in columns.items() if hasattr(column, "__len__")}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name} {length}" for name, length in lengths.items())
        raise ValueError(
            f"{where} has columns of different lengths ({shown}); each needs one row per example"
        )
