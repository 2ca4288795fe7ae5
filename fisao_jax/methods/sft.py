"""Supervised fine-tuning on LoRA: the autoregressive loss on response tokens (LLaVA's).

loss = sum over examples and response tokens of -log pi(token | prompt, previous tokens),
divided by the number of response tokens in the minibatch (`fisao_jax.policy.token_mean_nll`:
the token mean that LLaVA's trainer takes over the non-ignored labels; the prompt is never a
target).
"""
from __future__ import annotations

import optax
from jax import lax

from fisao_jax.models.vlm import VisionLanguageModel
from fisao_jax.policy import response_logprobs, token_mean_nll
from fisao_jax.update import make_minibatch_update

SFT_KEYS = ("input_ids", "attention_mask", "tokens", "mask", "weight")


def make_sft_loss(model: VisionLanguageModel):
    """loss_fn(params, minibatch, rng) -> (loss, stats): the minibatch holds SFT_KEYS ('tokens',
    'mask' [B, N] = the targets, EOS included) and the image inputs; `rng` drives the LoRA
    dropout (`model.lora_dropout`)."""

    def loss_fn(params, mb, rng):
        logp = response_logprobs(model, params, mb, mb["tokens"], mb["mask"], use_lora=True, deterministic=False,
                                 rngs={"dropout": rng})["logprobs"]
        loss, stats = token_mean_nll(logp, mb["mask"], mb["weight"])
        return loss, dict(stats, loss=lax.stop_gradient(loss))

    return loss_fn


def make_sft_update(model: VisionLanguageModel, optimizer: optax.GradientTransformation, num_minibatches: int = 1):
    """Pure `update(trainable, opt_state, step, frozen, batch, key)`: one optimizer step per
    minibatch on the LoRA; `key` drives the LoRA dropout. See `fisao_jax.update.make_minibatch_update`."""
    return make_minibatch_update(make_sft_loss(model), optimizer, num_minibatches=num_minibatches, rng=True)
