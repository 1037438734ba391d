"""Training: train state, optimizers and schedules, steps, checkpoints, logging, the loop.

Import submodules directly (``from hgrn_jax.training.loop import train_and_evaluate``); this
package imports nothing eagerly so that optax/orbax stay optional for the model code; the one
name it exports, :func:`~hgrn_jax.training.trained.load_trained_model` (a run folder's model
back as a Flax module), is imported when first asked for.
"""

from typing import Any

__all__ = ["load_trained_model"]


def __getattr__(name: str) -> Any:
    if name == "load_trained_model":
        from hgrn_jax.training.trained import load_trained_model

        return load_trained_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
