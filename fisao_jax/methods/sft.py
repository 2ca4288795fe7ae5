"""Supervised fine-tuning on LoRA: the autoregressive loss on response tokens (LLaVA's).

loss = sum over examples and response tokens of -log pi(token | prompt, previous tokens),
divided by the number of response tokens in the minibatch (the token mean that LLaVA's
trainer takes over the non-ignored labels; the prompt is never a target).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fisao_jax.methods.dpo import make_minibatch_update
from fisao_jax.models.llava import LlavaModel
from fisao_jax.ppo import logprobs_from_logits

SFT_KEYS = ("input_ids", "attention_mask", "pixel_values", "tokens", "mask", "weight")


def token_logprobs(model: LlavaModel, params: Any, batch: dict) -> jax.Array:
    """[B, N] log-probs (nats) of the response `tokens` after the prompt; 0 where mask is 0."""
    t = batch["input_ids"].shape[1]
    full_ids = jnp.concatenate([batch["input_ids"], batch["tokens"].astype(batch["input_ids"].dtype)], axis=1)
    full_mask = jnp.concatenate([batch["attention_mask"], batch["mask"]], axis=1).astype(jnp.int32)
    image_mask = jnp.concatenate([batch["input_ids"] == model.cfg.image_token_id,
                                  jnp.zeros(batch["tokens"].shape, bool)], axis=1)  # prompt image tokens only
    out = model.apply({"params": params}, full_ids, batch["pixel_values"], full_mask, use_lora=True,
                      logits_from=t - 1, image_mask=image_mask, method=LlavaModel.forward)
    logp = logprobs_from_logits(out["logits"][:, :-1], batch["tokens"])
    return jnp.where(batch["mask"] > 0, logp, 0.0)


def sft_loss(logp: jax.Array, mask: jax.Array, weight: jax.Array) -> tuple[jax.Array, dict]:
    """Token-mean negative log-likelihood: logp, mask [B, N]; weight [B] (0 = padding row).

    Returns (loss, {'sft/tokens': weighted token count, 'sft/nll_per_response': weighted
    mean of per-response summed NLL})."""
    m = (mask > 0).astype(jnp.float32) * weight[:, None].astype(jnp.float32)
    tokens = jnp.sum(m)
    loss = -jnp.sum(logp * m) / jnp.maximum(tokens, 1.0)
    per_response = -jnp.sum(jnp.where(mask > 0, logp, 0.0), axis=-1)
    w = weight.astype(jnp.float32)
    stats = {"sft/tokens": tokens, "sft/nll_per_response": jnp.sum(w * per_response) / jnp.maximum(jnp.sum(w), 1e-12)}
    return loss, jax.tree.map(lax.stop_gradient, stats)


def make_sft_update(model: LlavaModel, optimizer: optax.GradientTransformation, num_minibatches: int = 1):
    """`update(state, batch) -> (state, metrics)`: one optimizer step per minibatch on the LoRA.

    batch: {'input_ids', 'attention_mask' [B, T], 'pixel_values' [B, 3, H, W], 'tokens',
    'mask' [B, N] (targets, EOS included), 'weight' [B]}. See `make_minibatch_update`."""

    def loss_fn(params, mb):
        return sft_loss(token_logprobs(model, params, mb), mb["mask"], mb["weight"])

    return make_minibatch_update(loss_fn, optimizer, num_minibatches)
