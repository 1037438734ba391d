"""Losses with the metric sums the loop adds up over batches (exact evaluation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
    """ValueError (when traced too) unless ``labels`` are integers of shape ``logits.shape[:-1]``
    (B,): (B, 1) labels counted a (B, B) table of matches (an accuracy of thousands of percent),
    and float labels were truncated by the one-hot target."""
    if labels.shape != logits.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels of dtype {labels.dtype} and shape {labels.shape} for logits of shape "
            f"{logits.shape}: the loss takes integer class labels of shape {logits.shape[:-1]}, "
            "one per row of logits"
        )


def classification_loss(
    logits: jax.Array, labels: jax.Array, weight: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of logits (B, K) against labels (B,), and metric sums.

    With label smoothing s the target is ``(1 - s) * one_hot + s / K``. ``correct`` counts
    weighted rows whose arg-max is the label.
    """
    _check_labels(logits, labels)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    return soft_target_loss(logits, targets, labels, weight)


def soft_target_loss(
    logits: jax.Array, targets: jax.Array, labels: jax.Array, weight: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of logits (B, K) against target distributions (B, K) (e.g.
    Mixup / CutMix's); ``correct`` compares the arg-max with the hard ``labels`` (B,)."""
    _check_labels(logits, labels)
    logits = logits.astype(jnp.float32)
    weight = weight.astype(jnp.float32)
    per_row = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
    loss_sum = jnp.sum(per_row * weight)
    weight_sum = jnp.sum(weight)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weight)
    loss = loss_sum / jnp.maximum(weight_sum, 1.0)
    return loss, {"loss_sum": loss_sum, "weight": weight_sum, "correct": correct}


def next_token_loss(
    logits: jax.Array, targets: jax.Array, weight: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean next-token cross-entropy; logits (B, T, V), targets (B, T), weight (B, T).

    ``weight`` in the sums counts tokens; perplexity = exp(loss_sum / weight).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weight = weight.astype(jnp.float32)
    loss_sum = jnp.sum(nll * weight)
    weight_sum = jnp.sum(weight)
    return loss_sum / jnp.maximum(weight_sum, 1.0), {"loss_sum": loss_sum, "weight": weight_sum}
