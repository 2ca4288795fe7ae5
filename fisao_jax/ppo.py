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

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fisao_jax.update import make_minibatch_update

PolicyFn = Callable[[Any, dict], dict]
BATCH_KEYS = ("old_logp", "old_values", "advantages", "returns", "mask")


# ----------------------------------------------------------------------------- helpers


def _float(x: jax.Array) -> jax.Array:
    """x as a float of at least 32 bits (bf16/ints -> float32, float64 kept)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask) > 0


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


def objective_metrics(logp: jax.Array, kl_tokens: jax.Array, score_rewards: jax.Array,
                      mask: jax.Array, kl_coef) -> dict:
    """Rollout-side metrics with TRL's definitions (per-response sums, averaged over B).

    kl_tokens [B, N]: the per-token KL estimate the reward's penalty uses
    (`fisao_jax.rewards.reward.kl_estimate`); score_rewards [B, N]: the verifier's per-token
    rewards (without the KL penalty).

    `objective/kl` = mean_b sum_t kl_tokens; `objective/entropy` = mean_b sum_t -logp
    (TRL's sampled-entropy proxy); `objective/non_score_reward` = -kl_coef * kl;
    `objective/scores` = mean_b sum_t score_rewards; `objective/rlhf_reward` = scores +
    non_score_reward; `tokens/responses_len_mean` = mean number of real tokens.
    """
    m = _bool(mask)
    kl = masked_sum(kl_tokens, m, axis=1)
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


def check_batch(batch: dict) -> int:
    """Static shape checks of a PPO batch (run once per trace); returns the batch size B."""
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
    for k, v in batch.items():
        if not jnp.shape(v) or jnp.shape(v)[0] != mask_shape[0]:
            raise ValueError(f"ppo update: batch['{k}'] has shape {jnp.shape(v)}; every entry "
                             f"needs the leading batch dim {mask_shape[0]}")
    return mask_shape[0]


def ppo_loss_fn(policy_fn: PolicyFn, *, clip_eps: float, clip_eps_value: float, vf_coef: float,
                ent_coef: float = 0.0, use_value: bool = True):
    """loss_fn(params, minibatch) -> (loss, TRL-named stats) of clipped PPO:
    policy_loss + vf_coef * value_loss - ent_coef * mean entropy (no value loss when
    `use_value` is False)."""

    def loss_fn(params, mb):
        out = policy_fn(params, mb)
        for k in ("logp",) + (("values",) if use_value else ()):
            if k not in out:
                raise ValueError(f"ppo update: policy_fn output lacks '{k}'; has {sorted(out)}")
            if jnp.shape(out[k]) != jnp.shape(mb["mask"]):
                raise ValueError(f"ppo update: policy_fn output '{k}' has shape {jnp.shape(out[k])}, "
                                 f"expected {jnp.shape(mb['mask'])}")
        mask = mb["mask"]
        pg, pg_stats = policy_loss(out["logp"], mb["old_logp"], mb["advantages"], mask, clip_eps)
        loss = pg
        stats = {
            "policy/approxkl_avg": pg_stats["approxkl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "policy/policykl_avg": pg_stats["policykl"],
            "val/ratio": pg_stats["ratio"],
            "loss/policy_avg": pg,
        }
        if use_value:
            vf, vf_stats = value_loss(out["values"], mb["old_values"], mb["returns"], mask, clip_eps_value)
            loss = loss + vf_coef * vf
            stats.update({
                "loss/value_avg": vf,
                "val/clipfrac_avg": vf_stats["clipfrac"],
                "val/vpred": vf_stats["vpred"],
                "val/error": vf_stats["error"],
                "val/mean": masked_mean(mb["old_values"], mask),
                "val/var": masked_var(mb["old_values"], mask),
                "ppo/returns/mean": masked_mean(mb["returns"], mask),
                "ppo/returns/var": masked_var(mb["returns"], mask),
            })
        if "entropy" in out:
            entropy = masked_mean(out["entropy"], mask)
            loss = loss - ent_coef * entropy
            stats["policy/entropy_avg"] = lax.stop_gradient(entropy)
        elif ent_coef:
            raise ValueError("ppo update: ent_coef != 0 but policy_fn output lacks 'entropy'")
        stats["loss/total_avg"] = loss
        return loss, jax.tree.map(lax.stop_gradient, stats)

    return loss_fn


def make_ppo_update(policy_fn: PolicyFn, optimizer: optax.GradientTransformation, *,
                    ppo_epochs: int, num_minibatches: int, clip_eps: float = 0.2,
                    clip_eps_value: float = 0.2, vf_coef: float = 0.1, ent_coef: float = 0.0,
                    use_value: bool = True) -> Callable:
    """Pure `update(state: TrainState, frozen, batch, key) -> (state, metrics)`: ppo_epochs x
    shuffled minibatches, one optimizer step each (`fisao_jax.update.make_minibatch_update`;
    jit it with the caller's shardings).

    policy_fn(params, minibatch) -> {"logp": [b, N], "values": [b, N], "entropy": [b, N]}
    (entropy optional when ent_coef == 0; values unused when `use_value` is False) evaluates
    the current policy on a minibatch with the full merged params. batch: dict of arrays with
    leading dim B, holding what policy_fn needs plus `old_logp`, `old_values`, `advantages`
    (already whitened), `returns` and `mask`, all [B, N]. key: epoch e shuffles the batch with
    permutations drawn from split(key)[e] (`fisao_jax.update.minibatches`: the same on any mesh).

    Metrics: means over epochs x minibatches named as in TRL, `optim/grad_norm*`,
    `val/ratio_var`, `val/var_explained`, `policy/approxkl_first_minibatch` (the first step's,
    taken before any change of the policy) and `finite` (False: the state is returned unchanged).
    """
    ppo_epochs, num_minibatches = int(ppo_epochs), int(num_minibatches)
    if ppo_epochs < 1 or num_minibatches < 1:
        raise ValueError(f"make_ppo_update: ppo_epochs ({ppo_epochs}) and num_minibatches "
                         f"({num_minibatches}) must be >= 1")
    if not callable(policy_fn):
        raise ValueError(f"make_ppo_update: policy_fn must be callable, got {type(policy_fn).__name__}")
    loss_fn = ppo_loss_fn(policy_fn, clip_eps=clip_eps, clip_eps_value=clip_eps_value, vf_coef=vf_coef,
                          ent_coef=ent_coef, use_value=use_value)
    core = make_minibatch_update(loss_fn, optimizer, num_minibatches=num_minibatches, epochs=ppo_epochs,
                                 shuffle=True)

    def update(state, frozen, batch: dict, key: jax.Array):
        check_batch(batch)
        trainable, opt_state, step, metrics, stats = core(state.trainable, state.opt_state, state.step, frozen,
                                                          batch, key)
        ratios = stats["val/ratio"]
        metrics["val/ratio_var"] = jnp.var(ratios, ddof=1) if ratios.size > 1 else jnp.zeros_like(ratios[0])
        # before any step: 0 when old_logp came from this same computation (fisao_jax.scoring)
        metrics["policy/approxkl_first_minibatch"] = stats["policy/approxkl_avg"][0]
        if use_value:
            metrics["val/var_explained"] = 1.0 - metrics["val/error"] / metrics["ppo/returns/var"]
        return state.replace(trainable=trainable, opt_state=opt_state, step=step), metrics

    return update
