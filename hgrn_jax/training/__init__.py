"""Training: train state, optimizers and schedules, steps, checkpoints, logging, the loop.

Import submodules directly (``from hgrn_jax.training.loop import train_and_evaluate``); this
package imports nothing eagerly so that optax/orbax stay optional for the model code.
"""
