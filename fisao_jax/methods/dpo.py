"""Direct Preference Optimization (Rafailov et al., 2023) on the LoRA adapters.

For a prompt x with a preferred response y_w and a dispreferred one y_l:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with sequence log-probs (sums over response tokens, nats). The reference log-probs are
inputs: a caller computes them once with the reference parameters (`pair_logprobs`)
before the update, so no second copy of the model is kept while training. CSR's "reference
= the previous iteration's model" is exactly that: the pairs of iteration t are scored with
the parameters the iteration starts from.

The update is `fisao_jax.update.make_minibatch_update` (the one PPO and SFT use): a
`lax.scan` over the minibatches of the batch it is given, the optimizer on the trainable
leaves only, a non-finite guard, and per-example `weight`s so that padded rows (weight 0)
keep shapes static without counting.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fisao_jax.models.vlm import VisionLanguageModel
from fisao_jax.policy import image_features, sequence_logprobs
from fisao_jax.update import make_minibatch_update

PAIR_KEYS = ("input_ids", "attention_mask", "chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             beta: float, weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Weighted mean DPO loss over pairs and TRL-named statistics.

    All inputs [P] sequence log-probs in nats; weight [P] (default ones; 0 = padding).
    Stats: rewards/chosen = beta * (policy_chosen - ref_chosen), rewards/rejected likewise,
    rewards/margins = their difference, rewards/accuracies = share with margin > 0,
    logps/chosen, logps/rejected (weighted means).
    """
    f = lambda x: jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))  # noqa: E731
    pc, pr, rc, rr = f(policy_chosen), f(policy_rejected), f(ref_chosen), f(ref_rejected)
    w = jnp.ones_like(pc) if weight is None else f(weight)
    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    total = jnp.maximum(jnp.sum(w), 1e-12)
    mean = lambda x: jnp.sum(w * x) / total  # noqa: E731
    loss = mean(-jax.nn.log_sigmoid(margin))
    stats = {"rewards/chosen": mean(chosen_reward), "rewards/rejected": mean(rejected_reward),
             "rewards/margins": mean(margin), "rewards/accuracies": mean((margin > 0).astype(margin.dtype)),
             "logps/chosen": mean(pc), "logps/rejected": mean(pr)}
    return loss, jax.tree.map(lax.stop_gradient, stats)


def pair_logprobs(model: VisionLanguageModel, params: Any, batch: dict, use_lora: bool = True,
                  dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(chosen [P], rejected [P]) sequence log-probs; one forward over the 2P responses,
    one vision pass over the P images. batch: PAIR_KEYS arrays plus the image inputs.
    `dropout_rng` switches the LoRA dropout on (training passes only)."""
    feats = image_features(model, params, batch)
    p = batch["input_ids"].shape[0]
    two = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
    prompts = {"input_ids": two(batch["input_ids"]), "attention_mask": two(batch["attention_mask"])}
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    drop = {} if dropout_rng is None else {"deterministic": False, "rngs": {"dropout": dropout_rng}}
    lp = sequence_logprobs(model, params, prompts, tokens, mask, features=two(feats), use_lora=use_lora, **drop)
    return lp[:p], lp[p:]


def make_dpo_loss(model: VisionLanguageModel, beta: float):
    """loss_fn(params, minibatch, rng) -> (loss, stats) of DPO; the minibatch holds PAIR_KEYS,
    the image inputs, `ref_chosen_logp`, `ref_rejected_logp` [P] (nats) and `weight` [P]; `rng`
    drives the LoRA dropout (`model.lora_dropout`; the reference log-probs are without it)."""
    if not beta > 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")

    def loss_fn(params, mb, rng):
        chosen, rejected = pair_logprobs(model, params, mb, dropout_rng=rng)
        loss, stats = dpo_loss(chosen, rejected, mb["ref_chosen_logp"], mb["ref_rejected_logp"], beta, mb["weight"])
        return loss, dict(stats, loss=lax.stop_gradient(loss))

    return loss_fn


def make_dpo_update(model: VisionLanguageModel, optimizer: optax.GradientTransformation, *, beta: float,
                    num_minibatches: int = 1):
    """Pure `update(trainable, opt_state, step, frozen, batch, key)` of DPO on the trainable
    (LoRA) leaves: one optimizer step per minibatch of `batch` (P divisible by
    num_minibatches); `key` drives the LoRA dropout. See `fisao_jax.update.make_minibatch_update`."""
    return make_minibatch_update(make_dpo_loss(model, beta), optimizer, num_minibatches=num_minibatches, rng=True)
