"""The one minibatch update behind PPO, DPO and SFT (and the synthetic world's SFT).

`make_minibatch_update(loss_fn, optimizer, ...)` builds

    update(trainable, opt_state, step, frozen, batch, key)
        -> (trainable, opt_state, step, metrics, stats)

a pure, jittable function: `epochs` passes over `batch`, each cut into `num_minibatches`
minibatches (shuffled per epoch when `shuffle`), one optimizer step per minibatch, all inside
one `lax.scan`. Gradients reach `trainable` only; `frozen` (the base model) is read, never
copied into the optimizer state.

Rows, minibatches and shards. The B rows are B / M groups of M consecutive rows; minibatch m
takes one row of every group, and the per-epoch shuffle permutes the rows inside each group.
A mesh's batch shard holds whole groups (when B / M divides by its shard count), so slicing
and shuffling never move a row between devices, and the minibatches and their order are the
same on any mesh: a run on 8 devices updates exactly as a run on one.

Weights. An optional `weight` [B] entry marks padding rows (0): a minibatch whose weights are
all 0 changes nothing, and metrics are averaged over minibatches by their total weight.

Non-finite guard. If any minibatch's loss or gradient, or the updated state, holds a NaN or
inf, the input state comes back unchanged and `metrics['finite']` is False.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fisao_jax.params import VALUE_HEAD_KEY, merge_params

LossFn = Callable[..., tuple[jax.Array, dict]]
"""loss_fn(params, minibatch) -> (scalar loss, dict of scalar stats); params are merged. With
`rng=True`, loss_fn(params, minibatch, rng) gets a fresh key per step (LoRA dropout)."""


def all_finite(tree: Any) -> jax.Array:
    """True when every floating leaf of `tree` is finite (a 0-d bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def grad_norms(grads: Any) -> dict:
    """Global gradient norm, and the value head's and the adapters' apart (they share one clip)."""
    out = {"optim/grad_norm": optax.global_norm(grads)}
    if isinstance(grads, dict) and VALUE_HEAD_KEY in grads:
        out["optim/grad_norm_value_head"] = optax.global_norm(grads[VALUE_HEAD_KEY])
        out["optim/grad_norm_lora"] = optax.global_norm({k: v for k, v in grads.items() if k != VALUE_HEAD_KEY})
    return out


def group_permutations(key: jax.Array | None, size: int, num_minibatches: int) -> jax.Array | None:
    """[B / M, M] the per-group row permutations of an epoch (None without a key)."""
    if key is None:
        return None
    if size % num_minibatches:
        raise ValueError(f"minibatch update: batch size {size} is not divisible by num_minibatches={num_minibatches}")
    return jax.vmap(lambda k: jax.random.permutation(k, num_minibatches))(jax.random.split(key, size // num_minibatches))


def epoch_keys(key: jax.Array, epochs: int) -> jax.Array:
    """The shuffle key of each epoch, as the update draws them."""
    return jax.random.split(key, epochs)


def minibatches(batch: dict, num_minibatches: int, key: jax.Array | None) -> dict:
    """[M, B / M, ...] stacked minibatches of a batch of B rows: minibatch m holds row
    g * M + perm_g(m) of every group g (see the module docstring), perm_g drawn from `key`
    (None: the identity, minibatch m = rows m, M + m, 2M + m, ...)."""
    size = jax.tree.leaves(batch)[0].shape[0]
    m = num_minibatches
    if size % m:
        raise ValueError(f"minibatch update: batch size {size} is not divisible by num_minibatches={m}")
    groups = size // m
    perms = group_permutations(key, size, m)

    def split(x):
        x = x.reshape((groups, m) + x.shape[1:])
        if perms is not None:
            x = jax.vmap(lambda g, p: jnp.take(g, p, axis=0))(x, perms)
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def unminibatch(stacked: Any, key: jax.Array | None) -> Any:
    """Inverse of `minibatches`: [M, B / M, ...] leaves back to [B, ...] in the batch's row order."""
    m, groups = jax.tree.leaves(stacked)[0].shape[:2]
    perms = group_permutations(key, m * groups, m)
    inverse = None if perms is None else jnp.argsort(perms, axis=1)

    def join(x):
        x = jnp.swapaxes(x, 0, 1)  # [B/M, M, ...]
        if inverse is not None:
            x = jax.vmap(lambda g, p: jnp.take(g, p, axis=0))(x, inverse)
        return x.reshape((m * groups,) + x.shape[2:])

    return jax.tree.map(join, stacked)


def make_minibatch_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, num_minibatches: int,
                          epochs: int = 1, shuffle: bool = False, rng: bool = False):
    """See the module docstring. `key` may be None when neither `shuffle` nor `rng` is set; with
    `rng`, step i of epoch e passes fold_in(key_e, i) to the loss (key_e = `epoch_keys(key)[e]`,
    or `key` itself for one epoch without shuffling).

    Returns metrics = the stats averaged over all steps (weighted), `optim/grad_norm*`, and
    'finite'; `stats` = the per-step stats stacked [epochs * num_minibatches]."""
    num_minibatches, epochs = int(num_minibatches), int(epochs)
    if num_minibatches < 1 or epochs < 1:
        raise ValueError(f"make_minibatch_update: num_minibatches ({num_minibatches}) and epochs ({epochs}) "
                         f"must be >= 1")

    def objective(trainable, frozen, mb, step_key):
        params = merge_params(trainable, frozen)
        return loss_fn(params, mb, step_key) if rng else loss_fn(params, mb)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def update(trainable, opt_state, step, frozen, batch, key):
        def minibatch_step(carry, xs):
            mb, step_key = xs
            trainable, opt_state, step, finite = carry
            # Tie the frozen weights to the loop: otherwise XLA hoists their (FSDP) all-gathers out
            # of the loop as loop-invariant, and the whole gathered model stays in memory.
            frozen_now, trainable = lax.optimization_barrier((frozen, trainable))
            (loss, stats), grads = grad_fn(trainable, frozen_now, mb, step_key)
            updates, new_opt = optimizer.update(grads, opt_state, trainable)
            new_trainable = optax.apply_updates(trainable, updates)
            weight = jnp.sum(mb["weight"]) if "weight" in mb else jnp.float32(1.0)
            active = weight > 0
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)  # noqa: E731
            finite = finite & jnp.isfinite(loss) & all_finite(grads)
            stats = dict(stats, **grad_norms(grads))
            return ((keep(new_trainable, trainable), keep(new_opt, opt_state), step + active.astype(step.dtype),
                     finite), (stats, weight.astype(jnp.float32)))

        def epoch_step(carry, epoch_key):
            mbs = minibatches(batch, num_minibatches, epoch_key if shuffle else None)
            step_keys = jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(jnp.arange(num_minibatches))
            return lax.scan(minibatch_step, carry, (mbs, step_keys))

        if shuffle or (rng and epochs > 1):
            keys = epoch_keys(key, epochs)
        elif rng:
            keys = key[None]
        else:
            keys = jnp.zeros((epochs, 2), jnp.uint32)
        (new_trainable, new_opt, new_step, finite), (stats, weights) = lax.scan(
            epoch_step, (trainable, opt_state, step, jnp.bool_(True)), keys)
        stats = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stats)
        weights = weights.reshape(-1)
        finite = finite & all_finite(new_trainable) & all_finite(new_opt)
        total = jnp.maximum(jnp.sum(weights), 1e-12)
        metrics = jax.tree.map(lambda x: jnp.sum(x * weights) / total, stats)
        metrics["finite"] = finite
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        return (keep(new_trainable, trainable), keep(new_opt, opt_state), jnp.where(finite, new_step, step),
                metrics, stats)

    return update


def make_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW preceded by global-norm gradient clipping (`max_grad_norm=None` or 0: no clipping)."""
    if not callable(learning_rate) and not float(learning_rate) > 0:
        raise ValueError(f"make_optimizer: learning_rate must be > 0, got {learning_rate}")
    if max_grad_norm is not None and max_grad_norm != 0 and not float(max_grad_norm) > 0:
        raise ValueError(f"make_optimizer: max_grad_norm must be > 0 or None, got {max_grad_norm}")
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if not max_grad_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
