"""The policy interface: a LLaMA decoder whose input holds image features at its image tokens.

LLaVA and InstructBLIP differ only in how they turn images into features; everything after
that (image-token placement, decoder, LM head, value head, KV cache) is this base class.
A subclass builds its vision side in `setup_vision()` and defines

    image_features(**image_inputs) -> [N_img, num_image_tokens, D_text]

whose keyword arguments are the batch keys listed in `image_input_keys` (LLaVA:
`pixel_values`; InstructBLIP: `pixel_values`, `qformer_input_ids`,
`qformer_attention_mask`). Rollout, scoring, the PPO update, CSR and ViGoR call only
`image_features` and `forward`, so they work for every subclass unchanged.

`forward(input_ids, image_features, attention_mask, ...)` returns
{'logits' [B, T - logits_from, V] float32, 'values' [B, T] float32, 'hidden' [B, T, D],
'cache'}; `use_lora=False` gives the reference policy from the same weights.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fisao_jax.models.llama import HIDDEN, KVCache, LlamaModel, constrain


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip left padding: cumsum(mask) - 1, clipped at 0.  [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def check_image_tokens(input_ids, num_images: int, cfg: Any) -> None:
    """Raise if the image-token count in `input_ids` does not match `num_images` images."""
    ids = np.asarray(input_ids)
    found = int((ids == cfg.image_token_id).sum())
    expected = num_images * cfg.num_image_tokens
    if found != expected:
        raise ValueError(
            f"image tokens and image features do not match: input_ids hold {found} image tokens "
            f"(id {cfg.image_token_id}) but {num_images} image(s) give {expected} features "
            f"({cfg.num_image_tokens} per image)")


class VisionLanguageModel(nn.Module):
    """Base of every policy; `cfg` has `.text` (LlamaConfig), `.lora`, `.image_token_id` and
    `.num_image_tokens`. Parameter names: `language_model`, `lm_head`, `value_head`."""

    cfg: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False  # per-decoder-layer rematerialisation (PPO update memory)

    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    vision_param_key: ClassVar[str] = "vision_model"  # top-level params of the vision encoder

    def setup_vision(self) -> None:
        raise NotImplementedError

    def image_features(self, **image_inputs) -> jax.Array:
        raise NotImplementedError

    def setup(self):
        self.setup_vision()
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.language_model = LlamaModel(c.text, c.lora, remat=self.remat, **kw)
        if not c.text.tie_word_embeddings:
            self.lm_head = nn.Dense(c.text.vocab_size, use_bias=False, **kw)
        # float32 whatever the model's dtype: values are regressed onto returns of up to +-margin
        self.value_head = nn.Dense(1, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                                   param_dtype=jnp.float32)

    def embed_inputs(self, input_ids: jax.Array, image_features: Optional[jax.Array] = None,
                     image_mask: Optional[jax.Array] = None) -> jax.Array:
        """Token embeddings [B, T, D] with image features placed, in order, at the image positions.

        image_features [N_img, n, D] (images in row-major order of their tokens). image_mask
        [B, T] (default: input_ids == image_token_id) says which positions take features;
        elsewhere an image-token id is embedded like any token, as transformers does for one
        the model generates."""
        c = self.cfg
        is_img = input_ids == c.image_token_id if image_mask is None else image_mask.astype(bool)
        concrete = not isinstance(input_ids, jax.core.Tracer) and not isinstance(is_img, jax.core.Tracer)
        if concrete and image_features is not None:
            check_image_tokens(np.where(np.asarray(is_img), c.image_token_id, -1), image_features.shape[0], c)
        # ids outside the text vocabulary (an image token id past it) embed as 0, then get replaced
        embeds = self.language_model.embed(jnp.where(input_ids < c.text.vocab_size, input_ids, 0))
        if image_features is None:
            return embeds
        flat = image_features.reshape(-1, image_features.shape[-1]).astype(embeds.dtype)
        b, t = input_ids.shape
        order = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32)) - 1
        placed = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(b, t, -1)
        return jnp.where(is_img[..., None], placed, embeds)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V]."""
        if self.cfg.text.tie_word_embeddings:
            logits = self.language_model.logits(hidden)
        else:
            logits = self.lm_head(hidden)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def values(self, hidden: jax.Array) -> jax.Array:
        """Value head on the final hidden state: [B, T, D] -> [B, T] float32."""
        return self.value_head(hidden.astype(jnp.float32))[..., 0]

    def forward(self, input_ids: jax.Array, image_features: Optional[jax.Array] = None,
                attention_mask: Optional[jax.Array] = None, position_ids: Optional[jax.Array] = None,
                cache: Optional[KVCache] = None, key_mask: Optional[jax.Array] = None,
                use_lora: bool = True, deterministic: bool = True, logits_from: int = 0,
                image_mask: Optional[jax.Array] = None) -> dict:
        """{'logits' [B, T - logits_from, V] f32, 'values' [B, T] f32, 'hidden' [B, T, D], 'cache'}.

        attention_mask [B, T] marks real tokens of `input_ids` (left padding = 0). With a
        cache of S slots, `key_mask` [B, S] marks valid cache slots; without one the pass
        builds no cache ('cache' is None). `logits_from` (static) skips the LM head on
        earlier positions (the vocabulary projection of a 600-token image prompt is large and
        mostly unused)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        if key_mask is None:
            if cache is not None:
                raise ValueError("key_mask [B, cache_len] is required when a cache is given")
            key_mask = attention_mask
        embeds = constrain(self.embed_inputs(input_ids, image_features, image_mask), HIDDEN)
        hidden, cache = self.language_model(embeds, position_ids, key_mask, cache, use_lora, deterministic)
        return {"logits": self.lm_logits(hidden[:, logits_from:]), "values": self.values(hidden), "hidden": hidden,
                "cache": cache}

    def init_all(self, input_ids: jax.Array, **image_inputs) -> dict:
        """Touches every parameter (for `init` / `eval_shape`)."""
        feats = self.image_features(**image_inputs)
        return self.forward(input_ids, feats)
