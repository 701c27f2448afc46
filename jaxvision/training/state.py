"""The trainer's state as one pytree, and a model's train/eval mode."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step reads and writes, as one pytree."""

    params: nnx.State  # what gets gradients
    frozen: nnx.State  # parameters without gradients (fine-tuning's frozen features)
    rest: nnx.State  # every other model variable
    opt_state: optax.OptState
    key: jax.Array  # the run's key: each step folds in its global step


def with_mode(model: nnx.Module, *, train: bool) -> nnx.Module:
    """A view of `model` in train or eval mode (Dropout on or off)."""
    try:
        return nnx.view(model, deterministic=not train)
    except ValueError:  # no module in this model has a train/eval switch
        return model
