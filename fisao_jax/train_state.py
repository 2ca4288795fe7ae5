"""Train states: one `flax.struct` dataclass per method, saved and restored as it is.

`TrainState` holds what every optimiser carries; a method's state subclasses it with its
own counters (FiSAO: iteration, data position, RNG key, non-finite counts; CSR: iteration;
ViGoR: epoch). The frozen base weights are never part of a state: they come from the base
checkpoint, so a checkpoint is the adapters, the value head and the optimizer.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """trainable: the LoRA leaves and value head (`fisao_jax.params.split_params`);
    opt_state: optax state of `trainable`; step: applied optimizer steps (int32)."""

    trainable: Any
    opt_state: Any
    step: jax.Array

    def apply(self, update: Callable, frozen: Any, batch: dict, key: jax.Array) -> tuple["TrainState", dict]:
        """Run a `fisao_jax.update.make_minibatch_update` update on this state."""
        trainable, opt_state, step, metrics, _ = update(self.trainable, self.opt_state, self.step, frozen, batch, key)
        return self.replace(trainable=trainable, opt_state=opt_state, step=step), metrics


def counter(value: int = 0) -> jax.Array:
    """An int32 scalar for a state field."""
    return jnp.asarray(value, jnp.int32)


def init_opt_state(optimizer: optax.GradientTransformation, trainable: Any, layout=None) -> Any:
    """The optimizer state of `trainable`; with a `fisao_jax.placement.Layout`, laid out on its
    mesh (moments sharded as their parameters, counters replicated)."""
    if layout is None:
        return optimizer.init(trainable)
    abstract = jax.eval_shape(optimizer.init, trainable)
    shardings = layout.opt_state(optimizer, abstract, layout.of(trainable))
    return jax.jit(optimizer.init, out_shardings=shardings)(trainable)
