"""Teacher-forced passes of a policy over prompt + response: the one implementation behind
scoring, the PPO update, DPO, SFT and CSR.

A batch is a dict with the left-padded prompt `input_ids`, `attention_mask` [B, T] and the
policy's image inputs (`model.image_input_keys`: LLaVA `pixel_values` [B, 3, H, W];
InstructBLIP also `qformer_input_ids`, `qformer_attention_mask`). A response is `tokens`,
`mask` [B, N] (mask 1 on real tokens, a prefix of each row). Log-probs are in nats, float32.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from fisao_jax.models.vlm import VisionLanguageModel


def image_inputs(model: VisionLanguageModel, batch: dict) -> dict:
    """The batch entries `model.image_features` takes; KeyError naming the missing ones."""
    missing = [k for k in model.image_input_keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}, which {type(model).__name__} needs for its images; "
                       f"it has {sorted(batch)}")
    return {k: batch[k] for k in model.image_input_keys}


def image_features(model: VisionLanguageModel, params: Any, batch: dict) -> jax.Array:
    """[B, num_image_tokens, D_text] features of the batch's images."""
    return model.apply({"params": params}, **image_inputs(model, batch), method=model.image_features)


def prompt_image_mask(model: VisionLanguageModel, input_ids: jax.Array, num_new: int) -> jax.Array:
    """[B, T + num_new] bool: the prompt's image tokens; a generated image-token id is text."""
    b = input_ids.shape[0]
    return jnp.concatenate([input_ids == model.cfg.image_token_id, jnp.zeros((b, num_new), bool)], axis=1)


def logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[token]: logits [B, N, V], tokens [B, N] int -> [B, N] nats (float32).

    Computed as `z[token] - logsumexp(z)` with `z = logits - max(logits)`: shifting first keeps
    float32 exact for large logits, and XLA fuses it, so no log-softmax [B, N, V] is stored."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    z = logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) in nats: logits [..., V] -> [...] (float32).

    Stable for large logits and for -inf logits (masked vocabulary entries count as 0)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    p = jnp.exp(logp)
    # Select before multiplying so that neither value nor gradient sees 0 * -inf.
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


def response_logprobs(model: VisionLanguageModel, params: Any, batch: dict, tokens: jax.Array, mask: jax.Array, *,
                      features: Optional[jax.Array] = None, temperature: float = 1.0, use_lora: bool = True,
                      entropy: bool = False, deterministic: bool = True, rngs: Optional[dict] = None) -> dict:
    """One teacher-forced pass over prompt + response.

    Returns {'logprobs' [B, N] (log pi(token_i | prompt, tokens_<i) under logits / temperature,
    0 where mask is 0), 'values' [B, N] (the value head at the position that predicts token i,
    0 where mask is 0), 'entropy' [B, N] (only with `entropy=True`; 0 where mask is 0)}, all float32.
    `features` (from `image_features`) saves the vision pass when the caller already has it.
    The LM head runs on the response positions only."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    t = input_ids.shape[1]
    if features is None:
        features = image_features(model, params, batch)
    full_ids = jnp.concatenate([input_ids, tokens.astype(input_ids.dtype)], axis=1)
    full_mask = jnp.concatenate([attention_mask, mask], axis=1).astype(jnp.int32)
    out = model.apply({"params": params}, full_ids, features, full_mask, use_lora=use_lora,
                      deterministic=deterministic, logits_from=t - 1,
                      image_mask=prompt_image_mask(model, input_ids, tokens.shape[1]),
                      method=model.forward, rngs=rngs)
    logits = out["logits"][:, :-1] / temperature  # position t-1+i predicts token i
    real = mask > 0
    result = {"logprobs": jnp.where(real, logprobs_from_logits(logits, tokens), 0.0),
              "values": jnp.where(real, out["values"][:, t - 1:-1], 0.0)}
    if entropy:
        result["entropy"] = jnp.where(real, entropy_from_logits(logits), 0.0)
    return result


def sequence_logprobs(model: VisionLanguageModel, params: Any, batch: dict, tokens: jax.Array, mask: jax.Array,
                      **kw) -> jax.Array:
    """[B] sum over the response of log pi(token | prompt, previous tokens), nats."""
    return jnp.sum(response_logprobs(model, params, batch, tokens, mask, **kw)["logprobs"], axis=-1)


def token_mean_nll(logp: jax.Array, mask: jax.Array, weight: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """The supervised (SFT) loss: mean negative log-likelihood per response token.

    logp, mask [B, N] (nats, mask 1 on target tokens); weight [B] (0 = padding row, default 1).
    Returns (loss, {'sft/tokens': weighted token count, 'sft/nll_per_response': weighted mean of
    the per-response summed NLL})."""
    w = jnp.ones(logp.shape[:1], jnp.float32) if weight is None else weight.astype(jnp.float32)
    m = (mask > 0).astype(jnp.float32) * w[:, None]
    tokens = jnp.sum(m)
    loss = -jnp.sum(logp * m) / jnp.maximum(tokens, 1.0)
    per_response = -jnp.sum(jnp.where(mask > 0, logp, 0.0), axis=-1)
    stats = {"sft/tokens": tokens, "sft/nll_per_response": jnp.sum(w * per_response) / jnp.maximum(jnp.sum(w), 1e-12)}
    return loss, jax.tree.map(lax.stop_gradient, stats)
