"""Direct Preference Optimization (Rafailov et al., 2023) on the LoRA adapters.

For a prompt x with a preferred response y_w and a dispreferred one y_l:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with sequence log-probs (sums over response tokens, nats). The reference log-probs are
inputs: a caller computes them once with the reference parameters (`make_pair_logprobs`)
before the update, so no second copy of the model is kept while training. CSR's "reference
= the previous iteration's model" is exactly that: the pairs of iteration t are scored with
the parameters the iteration starts from.

`make_minibatch_update` is the shared one-jit training step (DPO here, SFT in
`fisao_jax.methods.sft`): a `lax.scan` over consecutive minibatches of the batch it is
given, optimizer on the trainable leaves only (`fisao_jax.params`), a non-finite guard,
and per-example `weight`s so that padded rows (weight 0) keep shapes static without
counting.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fisao_jax.models.llava import LlavaModel
from fisao_jax.params import merge_params
from fisao_jax.ppo import PPOState, _all_finite, logprobs_from_logits

LossFn = Callable[[Any, dict], tuple[jax.Array, dict]]
PAIR_KEYS = ("input_ids", "attention_mask", "pixel_values", "chosen_tokens", "chosen_mask", "rejected_tokens",
             "rejected_mask")


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


def sequence_logprobs(model: LlavaModel, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                      tokens: jax.Array, mask: jax.Array, pixel_values: jax.Array | None = None,
                      image_features: jax.Array | None = None, use_lora: bool = True) -> jax.Array:
    """[B] sum over response tokens of log pi(token | prompt, previous tokens), nats.

    input_ids, attention_mask [B, T] (left-padded prompt); tokens, mask [B, N] (response,
    mask 1 on real tokens). The LM head runs on the response positions only.
    """
    t = input_ids.shape[1]
    full_ids = jnp.concatenate([input_ids, tokens.astype(input_ids.dtype)], axis=1)
    full_mask = jnp.concatenate([attention_mask, mask], axis=1).astype(jnp.int32)
    # image features go to the prompt's image tokens only, never to a generated image-token id
    image_mask = jnp.concatenate([input_ids == model.cfg.image_token_id, jnp.zeros(tokens.shape, bool)], axis=1)
    out = model.apply({"params": params}, full_ids, pixel_values, full_mask, use_lora=use_lora,
                      image_features=image_features, logits_from=t - 1, image_mask=image_mask,
                      method=LlavaModel.forward)
    logp = logprobs_from_logits(out["logits"][:, :-1], tokens)  # position t-1+i predicts token i
    return jnp.sum(jnp.where(mask > 0, logp, 0.0), axis=-1)


def pair_logprobs(model: LlavaModel, params: Any, batch: dict, use_lora: bool = True) -> tuple[jax.Array, jax.Array]:
    """(chosen [P], rejected [P]) sequence log-probs; one forward over the 2P responses,
    one vision pass over the P images."""
    feats = model.apply({"params": params}, batch["pixel_values"], method=LlavaModel.image_features)
    p = batch["input_ids"].shape[0]
    two = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    lp = sequence_logprobs(model, params, two(batch["input_ids"]), two(batch["attention_mask"]), tokens, mask,
                           image_features=two(feats), use_lora=use_lora)
    return lp[:p], lp[p:]


def make_pair_logprobs(model: LlavaModel):
    """jitted (params, batch) -> (chosen [P], rejected [P]): reference log-probs of pairs."""
    return jax.jit(lambda params, batch: pair_logprobs(model, params, {k: batch[k] for k in PAIR_KEYS}))


def make_minibatch_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, num_minibatches: int):
    """Build the jitted `update(state: PPOState, batch) -> (state, metrics)`.

    batch: dict of arrays with leading dim M * b (M = num_minibatches), including
    `weight` [M * b]; minibatch i is rows [i*b, (i+1)*b) (shuffle on the host).
    loss_fn(params, minibatch) -> (scalar loss, dict of scalar stats), params merged.
    A minibatch whose weights are all 0 changes nothing. If any loss, gradient or updated
    leaf is non-finite, the input state comes back unchanged and metrics['finite'] is False.
    Metrics: stats averaged over minibatches, weighted by their total weight, plus
    'optim/grad_norm' and 'finite'.
    """
    num_minibatches = int(num_minibatches)
    if num_minibatches < 1:
        raise ValueError(f"make_minibatch_update: num_minibatches must be >= 1, got {num_minibatches}")

    def objective(trainable, frozen, mb):
        return loss_fn(merge_params(trainable, frozen), mb)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    @jax.jit
    def _update(trainable, opt_state, step, frozen, batch):
        size = batch["weight"].shape[0]
        if size % num_minibatches:
            raise ValueError(f"minibatch update: batch size {size} is not divisible by "
                             f"num_minibatches={num_minibatches}")
        stacked = jax.tree.map(lambda x: x.reshape((num_minibatches, size // num_minibatches) + x.shape[1:]), batch)

        def body(carry, mb):
            trainable, opt_state, step, finite = carry
            (loss, stats), grads = grad_fn(trainable, frozen, mb)
            updates, new_opt = optimizer.update(grads, opt_state, trainable)
            new_trainable = optax.apply_updates(trainable, updates)
            active = jnp.sum(mb["weight"]) > 0
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)  # noqa: E731
            finite = finite & jnp.isfinite(loss) & _all_finite(grads)
            stats = dict(stats, loss=loss, **{"optim/grad_norm": optax.global_norm(grads)})
            return (keep(new_trainable, trainable), keep(new_opt, opt_state), step + active.astype(step.dtype),
                    finite), (stats, jnp.sum(mb["weight"]))

        (new_trainable, new_opt, new_step, finite), (stats, weights) = lax.scan(
            body, (trainable, opt_state, step, jnp.bool_(True)), stacked)
        finite = finite & _all_finite(new_trainable) & _all_finite(new_opt)
        total = jnp.maximum(jnp.sum(weights), 1e-12)
        metrics = jax.tree.map(lambda s: jnp.sum(s * weights) / total, stats)
        metrics["finite"] = finite
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        return keep(new_trainable, trainable), keep(new_opt, opt_state), jnp.where(finite, new_step, step), metrics

    def update(state: PPOState, batch: dict) -> tuple[PPOState, dict]:
        if "weight" not in batch:
            raise ValueError(f"minibatch update: batch needs a 'weight' entry; has {sorted(batch)}")
        trainable, opt_state, step, metrics = _update(state.trainable, state.opt_state, state.step, state.frozen,
                                                      batch)
        return PPOState(trainable, state.frozen, opt_state, step), metrics

    update.jitted = _update
    return update


def make_dpo_update(model: LlavaModel, optimizer: optax.GradientTransformation, *, beta: float,
                    num_minibatches: int = 1):
    """`update(state, batch) -> (state, metrics)`: DPO on the trainable (LoRA) leaves.

    batch: PAIR_KEYS arrays ([P, T] prompt, [P, 3, H, W] images, [P, N] responses and
    masks) plus `ref_chosen_logp`, `ref_rejected_logp` [P] (nats, from the reference
    model) and `weight` [P]; P divisible by num_minibatches. See `make_minibatch_update`.
    """
    if not beta > 0:
        raise ValueError(f"make_dpo_update: beta must be > 0, got {beta}")

    def loss_fn(params, mb):
        chosen, rejected = pair_logprobs(model, params, mb)
        return dpo_loss(chosen, rejected, mb["ref_chosen_logp"], mb["ref_rejected_logp"], beta, mb["weight"])

    return make_minibatch_update(loss_fn, optimizer, num_minibatches)
