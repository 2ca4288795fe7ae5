"""The one minibatch update behind PPO, DPO and SFT (and the synthetic world's SFT).

`make_minibatch_update(loss_fn, optimizer, ...)` builds

    update(trainable, opt_state, step, frozen, batch, key)
        -> (trainable, opt_state, step, metrics, stats)

a pure, jittable function: `epochs` passes over `batch`, each cut into `num_minibatches`
minibatches (shuffled per epoch when `shuffle`), one optimizer step per minibatch, all inside
one `lax.scan`. Gradients reach `trainable` only; `frozen` (the base model) is read, never
copied into the optimizer state.

Rows and shards. With `batch_shards = S` (the mesh's batch shards), the batch's rows are S
contiguous blocks, one per shard. Minibatches and the shuffle stay inside the blocks:
minibatch m takes the same number of rows from every block, so a sharded batch is never
moved between devices.

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

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]
"""loss_fn(params, minibatch) -> (scalar loss, dict of scalar stats); params are merged."""


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


def minibatches(batch: dict, num_minibatches: int, batch_shards: int, key: jax.Array | None) -> dict:
    """[M, B / M, ...] stacked minibatches of a batch of B rows: minibatch m holds rows
    m*k .. (m+1)*k - 1 of every shard's block (k = B / (S M)), after a per-block permutation
    drawn from `key` (None: no shuffle)."""
    size = jax.tree.leaves(batch)[0].shape[0]
    s, m = batch_shards, num_minibatches
    if size % (s * m):
        raise ValueError(f"minibatch update: batch size {size} is not divisible by num_minibatches={m} "
                         f"x batch shards={s}")
    k = size // (s * m)

    def split(x):
        blocks = x.reshape((s, size // s) + x.shape[1:])
        if key is not None:
            perms = jax.vmap(lambda kk: jax.random.permutation(kk, size // s))(jax.random.split(key, s))
            blocks = jax.vmap(lambda blk, p: jnp.take(blk, p, axis=0))(blocks, perms)
        blocks = blocks.reshape((s, m, k) + x.shape[1:])
        return jnp.swapaxes(blocks, 0, 1).reshape((m, s * k) + x.shape[1:])

    return jax.tree.map(split, batch)


def make_minibatch_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, num_minibatches: int,
                          epochs: int = 1, shuffle: bool = False, batch_shards: int = 1):
    """See the module docstring. `key` may be None when `shuffle` is False.

    Returns metrics = the stats averaged over all steps (weighted), `optim/grad_norm*`, and
    'finite'; `stats` = the per-step stats stacked [epochs * num_minibatches]."""
    num_minibatches, epochs, batch_shards = int(num_minibatches), int(epochs), int(batch_shards)
    if num_minibatches < 1 or epochs < 1 or batch_shards < 1:
        raise ValueError(f"make_minibatch_update: num_minibatches ({num_minibatches}), epochs ({epochs}) and "
                         f"batch_shards ({batch_shards}) must be >= 1")

    def objective(trainable, frozen, mb):
        return loss_fn(merge_params(trainable, frozen), mb)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def update(trainable, opt_state, step, frozen, batch, key):
        def minibatch_step(carry, mb):
            trainable, opt_state, step, finite = carry
            (loss, stats), grads = grad_fn(trainable, frozen, mb)
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
            mbs = minibatches(batch, num_minibatches, batch_shards, epoch_key if shuffle else None)
            return lax.scan(minibatch_step, carry, mbs)

        keys = jax.random.split(key, epochs) if shuffle else jnp.zeros((epochs, 2), jnp.uint32)
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
