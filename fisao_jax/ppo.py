"""Token-level PPO: GAE, whitening, clipped losses, metrics and the jitted update.

Conventions. Per-token tensors are `[B, N]` over the N response tokens, with `mask [B, N]`
(1 on real response tokens, 0 on the padding after EOS; real tokens form a prefix). Log-probs
are in nats. Values at masked positions never reach a result (they are selected away with
`jnp.where`, so NaN or garbage in the padding is harmless). Every reduction runs in at least
float32 (bf16 inputs are promoted; float64 inputs stay float64).

The loss, statistics and metric names follow Hugging Face TRL's PPO trainer:
`masked_mean`/`masked_var`/`masked_whiten` are TRL's (`trl.trainer.utils`: variance with
Bessel's correction, whitening `(x - mean) * rsqrt(var + 1e-8)`), the policy and value
losses are TRL's `PPOTrainer` losses (value loss `0.5 * mean(max(l1, l2))`), and the metric
keys are TRL's PPOTrainer keys (`policy/approxkl_avg`, `loss/value_avg`, ...); the value
diagnostics it no longer logs (`val/vpred`, `val/error`, `val/mean`, `val/var`,
`val/var_explained`, `ppo/returns/mean`, `ppo/returns/var`) follow its older PPO trainer.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fisao_jax.params import merge_params, split_params

PolicyFn = Callable[[Any, dict], dict]
BATCH_KEYS = ("old_logp", "old_values", "advantages", "returns", "mask")


# ----------------------------------------------------------------------------- helpers


def _float(x: jax.Array) -> jax.Array:
    """x as a float of at least 32 bits (bf16/ints -> float32, float64 kept)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask) > 0


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[token]: logits [B, N, V], tokens [B, N] int -> [B, N] nats (float32).

    Computed as `z[token] - logsumexp(z)` with `z = logits - max(logits)`: shifting first keeps
    float32 exact for large logits, and XLA fuses it, so no log-softmax [B, N, V] is stored.
    """
    logits = _float(logits)
    z = logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) in nats: logits [..., V] -> [...] (float32).

    Stable for large logits and for -inf logits (masked vocabulary entries count as 0).
    """
    logp = jax.nn.log_softmax(_float(logits), axis=-1)
    p = jnp.exp(logp)
    # Select before multiplying so that neither value nor gradient sees 0 * -inf.
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of x over positions where mask > 0."""
    x = _float(x)
    return jnp.sum(jnp.where(_bool(mask), x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of x over positions where mask > 0 (TRL's `masked_mean`); 0 where the mask is empty.

    TRL divides by zero on an empty mask; we return 0 so that one empty minibatch cannot
    poison a jitted update.
    """
    x = _float(x)
    count = jnp.sum(_bool(mask), axis=axis).astype(x.dtype)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of x over positions where mask > 0, over all axes (TRL's `masked_var`).

    `unbiased=True` (TRL's default) multiplies by n / (n - 1) (Bessel). TRL raises for n = 0
    and divides by zero for n = 1; under jit we return the biased value (0) for n <= 1.
    """
    x = _float(x)
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered ** 2, mask)
    if unbiased:
        n = jnp.sum(_bool(mask)).astype(x.dtype)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), 1.0)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """TRL's `masked_whiten`: (x - mean) * rsqrt(var + 1e-8), mean/unbiased var over the mask.

    With `shift_mean=False` the mean is added back (scale only). Masked positions are
    transformed by the same affine map (TRL then fills them; `compute_advantages` zeroes them).
    """
    x = _float(x)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * lax.rsqrt(masked_var(x, mask, unbiased=True) + 1e-8)
    return whitened if shift_mean else whitened + mean


# --------------------------------------------------------------------------------- GAE


def compute_gae(rewards: jax.Array, values: jax.Array, mask: jax.Array,
                gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation: rewards, values, mask [B, N] -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.
    Rewards and values at masked positions are read as 0, so the value bootstrapped after
    the last real token is 0. Advantages and returns are 0 on padding. A reverse `lax.scan`
    over the N tokens.
    """
    m = _bool(mask)
    dtype = jnp.result_type(_float(rewards), _float(values))
    r = jnp.where(m, rewards, 0.0).astype(dtype)
    v = jnp.where(m, values, 0.0).astype(dtype)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    deltas = r + gamma * next_v - v

    def step(next_adv, delta_t):
        adv = delta_t + gamma * lam * next_adv
        return adv, adv

    _, adv = lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    adv = jnp.where(m, adv.T, 0.0)
    return adv, jnp.where(m, adv + v, 0.0)


def compute_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array,
                       gamma: float, lam: float, whiten: bool = True) -> tuple[jax.Array, jax.Array]:
    """GAE advantages (whitened over the real tokens of the whole batch) and unwhitened returns.

    rewards, values, mask [B, N] -> (advantages [B, N], returns [B, N]), both 0 on padding.
    """
    adv, returns = compute_gae(rewards, values, mask, gamma, lam)
    if whiten:
        adv = jnp.where(_bool(mask), masked_whiten(adv, mask), 0.0)
    return adv, returns


# ------------------------------------------------------------------------------ losses


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_eps: float) -> tuple[jax.Array, dict]:
    """Clipped PPO surrogate: masked mean of max(-A * ratio, -A * clip(ratio, 1 +- clip_eps)).

    logp, old_logp, advantages, mask [B, N]. Returns `(loss, stats)` with stats `clipfrac`
    (share of tokens where the clipped term is larger), `approxkl` = 0.5 * mean((logp -
    old_logp)^2), `policykl` = mean(old_logp - logp) and `ratio` (mean ratio), all over the mask
    (TRL's newer trainer averages approxkl over padding too, where the difference is 0; the
    masked mean here is its older trainer's and does not depend on the padding length).
    """
    m = _bool(mask)
    diff = jnp.where(m, _float(logp) - _float(old_logp), 0.0)
    adv = jnp.where(m, _float(advantages), 0.0)
    ratio = jnp.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), m)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(diff.dtype), m),
        "approxkl": 0.5 * masked_mean(diff ** 2, m),
        "policykl": masked_mean(-diff, m),
        "ratio": masked_mean(ratio, m),
    }
    return loss, jax.tree.map(lax.stop_gradient, stats)


def value_loss(vpred: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip_eps_value: float) -> tuple[jax.Array, dict]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    vpred, old_values, returns, mask [B, N]. Returns `(loss, stats)` with stats `clipfrac`
    (share of tokens where the clipped error is larger), `vpred` (mean prediction) and
    `error` (mean squared error of the unclipped prediction), all over the mask.
    """
    m = _bool(mask)
    v = jnp.where(m, _float(vpred), 0.0)
    old = jnp.where(m, _float(old_values), 0.0)
    ret = jnp.where(m, _float(returns), 0.0)
    v_clipped = jnp.clip(v, old - clip_eps_value, old + clip_eps_value)
    err = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), m)
    stats = {
        "clipfrac": masked_mean((err_clipped > err).astype(v.dtype), m),
        "vpred": masked_mean(v, m),
        "error": masked_mean(err, m),
    }
    return loss, jax.tree.map(lax.stop_gradient, stats)


# ----------------------------------------------------------------------------- metrics


def objective_metrics(logp: jax.Array, ref_logp: jax.Array, score_rewards: jax.Array,
                      mask: jax.Array, kl_coef: float) -> dict:
    """Rollout-side metrics with TRL's definitions (per-response sums, averaged over B).

    score_rewards [B, N]: the verifier's per-token rewards (without the KL penalty).

    `objective/kl` = mean_b sum_t (logp - ref_logp); `objective/entropy` = mean_b sum_t -logp
    (TRL's sampled-entropy proxy); `objective/non_score_reward` = -kl_coef * kl;
    `objective/scores` = mean_b sum_t score_rewards; `objective/rlhf_reward` = scores +
    non_score_reward; `tokens/responses_len_mean` = mean number of real tokens.
    """
    m = _bool(mask)
    kl = masked_sum(_float(logp) - _float(ref_logp), m, axis=1)
    scores = masked_sum(score_rewards, m, axis=1)
    non_score = -kl_coef * kl
    return {
        "objective/kl": jnp.mean(kl),
        "objective/entropy": jnp.mean(masked_sum(-_float(logp), m, axis=1)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/scores": jnp.mean(scores),
        "objective/rlhf_reward": jnp.mean(scores + non_score),
        "tokens/responses_len_mean": jnp.mean(jnp.sum(m, axis=1).astype(kl.dtype)),
    }


# ------------------------------------------------------------------------------ update


class PPOState(NamedTuple):
    """What the PPO update carries: trainable leaves, frozen leaves, optax state, step.

    `step` counts applied updates (an update rejected by the non-finite guard does not count).
    `opt_state` is built from `trainable` only.
    """

    trainable: Any
    frozen: Any
    opt_state: Any
    step: jax.Array


def init_ppo_state(params: Any, optimizer: optax.GradientTransformation) -> PPOState:
    """Split `params` (see `fisao_jax.params`) and initialise the optimizer on the trainable part."""
    trainable, frozen = split_params(params)
    return PPOState(trainable, frozen, optimizer.init(trainable), jnp.zeros((), jnp.int32))


def make_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW preceded by global-norm gradient clipping (`max_grad_norm=None`: no clipping)."""
    if not callable(learning_rate) and not float(learning_rate) > 0:
        raise ValueError(f"make_optimizer: learning_rate must be > 0, got {learning_rate}")
    if max_grad_norm is not None and not float(max_grad_norm) > 0:
        raise ValueError(f"make_optimizer: max_grad_norm must be > 0 or None, got {max_grad_norm}")
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _check_batch(batch: dict, num_minibatches: int) -> int:
    """Static shape checks (run once per trace); returns the batch size B."""
    if not isinstance(batch, dict):
        raise ValueError(f"ppo update: batch must be a dict of arrays, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"ppo update: batch lacks key(s) {missing}; has {sorted(batch)}")
    mask_shape = jnp.shape(batch["mask"])
    if len(mask_shape) != 2:
        raise ValueError(f"ppo update: batch['mask'] must be [B, N], got shape {mask_shape}")
    for k in BATCH_KEYS:
        if jnp.shape(batch[k]) != mask_shape:
            raise ValueError(f"ppo update: batch['{k}'] has shape {jnp.shape(batch[k])}, "
                             f"expected {mask_shape} like batch['mask']")
    size = mask_shape[0]
    for k, v in batch.items():
        if not jnp.shape(v) or jnp.shape(v)[0] != size:
            raise ValueError(f"ppo update: batch['{k}'] has shape {jnp.shape(v)}; every entry "
                             f"needs the leading batch dim {size}")
    if size % num_minibatches:
        raise ValueError(f"ppo update: batch size {size} is not divisible by "
                         f"num_minibatches={num_minibatches}")
    return size


def make_ppo_update(policy_fn: PolicyFn, optimizer: optax.GradientTransformation, *,
                    ppo_epochs: int, num_minibatches: int, clip_eps: float = 0.2,
                    clip_eps_value: float = 0.2, vf_coef: float = 0.1, ent_coef: float = 0.0,
                    donate: bool = False) -> Callable[[PPOState, dict, jax.Array], tuple[PPOState, dict]]:
    """Build `update(state, batch, key) -> (state, metrics)`: ppo_epochs x shuffled minibatches.

    policy_fn(params, minibatch) -> {"logp": [b, N], "values": [b, N], "entropy": [b, N]}
    (entropy optional when ent_coef == 0) evaluates the current policy on a minibatch (a dict
    slice of `batch`, leading dim b = B / num_minibatches) with the full merged params.
    batch: dict of arrays with leading dim B, holding whatever policy_fn needs plus
    `old_logp`, `old_values`, `advantages` (already whitened), `returns` and `mask`, all [B, N].
    key: a PRNG key; epoch e shuffles the batch with a permutation drawn from split(key)[e].

    Loss per minibatch: policy_loss + vf_coef * value_loss - ent_coef * mean entropy.
    The whole update (all epochs and minibatches) is one jitted function of static shapes.
    Gradients reach `state.trainable` only; `state.frozen` is returned as the same object.

    Non-finite guard: `metrics["finite"]` is False when any minibatch's loss or gradient, or
    the updated params, hold a NaN/inf; the returned state is then the input state unchanged
    (the caller counts skips). Other metrics are means over epochs x minibatches, named as in
    TRL. `donate=True` donates the input trainable params and optimizer state buffers.
    """
    ppo_epochs, num_minibatches = int(ppo_epochs), int(num_minibatches)
    if ppo_epochs < 1 or num_minibatches < 1:
        raise ValueError(f"make_ppo_update: ppo_epochs ({ppo_epochs}) and num_minibatches "
                         f"({num_minibatches}) must be >= 1")
    if not callable(policy_fn):
        raise ValueError(f"make_ppo_update: policy_fn must be callable, got {type(policy_fn).__name__}")

    def loss_fn(trainable, frozen, mb):
        out = policy_fn(merge_params(trainable, frozen), mb)
        for k in ("logp", "values"):
            if k not in out:
                raise ValueError(f"ppo update: policy_fn output lacks '{k}'; has {sorted(out)}")
            if jnp.shape(out[k]) != jnp.shape(mb["mask"]):
                raise ValueError(f"ppo update: policy_fn output '{k}' has shape {jnp.shape(out[k])}, "
                                 f"expected {jnp.shape(mb['mask'])}")
        mask = mb["mask"]
        pg, pg_stats = policy_loss(out["logp"], mb["old_logp"], mb["advantages"], mask, clip_eps)
        vf, vf_stats = value_loss(out["values"], mb["old_values"], mb["returns"], mask, clip_eps_value)
        loss = pg + vf_coef * vf
        stats = {
            "policy/approxkl_avg": pg_stats["approxkl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "policy/policykl_avg": pg_stats["policykl"],
            "val/ratio": pg_stats["ratio"],
            "loss/policy_avg": pg,
            "loss/value_avg": vf,
            "val/clipfrac_avg": vf_stats["clipfrac"],
            "val/vpred": vf_stats["vpred"],
            "val/error": vf_stats["error"],
            "val/mean": masked_mean(mb["old_values"], mask),
            "val/var": masked_var(mb["old_values"], mask),
            "ppo/returns/mean": masked_mean(mb["returns"], mask),
            "ppo/returns/var": masked_var(mb["returns"], mask),
        }
        if "entropy" in out:
            entropy = masked_mean(out["entropy"], mask)
            loss = loss - ent_coef * entropy
            stats["policy/entropy_avg"] = lax.stop_gradient(entropy)
        elif ent_coef:
            raise ValueError("ppo update: ent_coef != 0 but policy_fn output lacks 'entropy'")
        stats["loss/total_avg"] = loss
        return loss, jax.tree.map(lax.stop_gradient, stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
    def _update(trainable, opt_state, step, frozen, batch, key):
        size = _check_batch(batch, num_minibatches)
        mb_size = size // num_minibatches

        def minibatch_step(carry, idx):
            trainable, opt_state, finite = carry
            mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch)
            (loss, stats), grads = grad_fn(trainable, frozen, mb)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            finite = finite & jnp.isfinite(loss) & _all_finite(grads)
            stats["optim/grad_norm_avg"] = optax.global_norm(grads)
            return (trainable, opt_state, finite), stats

        def epoch_step(carry, epoch_key):
            perm = jax.random.permutation(epoch_key, size).reshape(num_minibatches, mb_size)
            return lax.scan(minibatch_step, carry, perm)

        keys = jax.random.split(key, ppo_epochs)
        (new_trainable, new_opt_state, finite), stats = lax.scan(
            epoch_step, (trainable, opt_state, jnp.bool_(True)), keys)
        finite = finite & _all_finite(new_trainable) & _all_finite(new_opt_state)

        metrics = jax.tree.map(jnp.mean, stats)
        ratios = stats["val/ratio"].reshape(-1)
        metrics["val/ratio_var"] = jnp.var(ratios, ddof=1) if ratios.size > 1 else jnp.zeros_like(ratios[0])
        metrics["val/var_explained"] = 1.0 - metrics["val/error"] / metrics["ppo/returns/var"]
        metrics["finite"] = finite

        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        return (keep(new_trainable, trainable), keep(new_opt_state, opt_state),
                jnp.where(finite, step + 1, step), metrics)

    def update(state: PPOState, batch: dict, key: jax.Array) -> tuple[PPOState, dict]:
        trainable, opt_state, step, metrics = _update(
            state.trainable, state.opt_state, state.step, state.frozen, batch, key)
        return PPOState(trainable, state.frozen, opt_state, step), metrics

    return update
