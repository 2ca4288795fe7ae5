"""LLaVA-1.5: CLIP vision tower -> 2-layer GELU projector -> LLaMA decoder, plus a value head.

`LlavaModel.apply({'params': p}, input_ids, pixel_values, attention_mask)` returns logits
[B, T, V] like transformers' `LlavaForConditionalGeneration`. `method=LlavaModel.forward`
returns a dict with logits, values (the value head, [B, T]), the final hidden state and the
KV cache, for rollout and PPO. `use_lora=False` gives the reference policy.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fisao_jax.models.clip import CLIPVisionTransformer, activation
from fisao_jax.models.configs import LlavaConfig
from fisao_jax.models.llama import KVCache, LlamaModel


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip left padding: cumsum(mask) - 1, clipped at 0.  [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def check_image_tokens(input_ids, num_images: int, cfg: LlavaConfig) -> None:
    """Raise if the image-token count in `input_ids` does not match `num_images` images."""
    ids = np.asarray(input_ids)
    found = int((ids == cfg.image_token_id).sum())
    expected = num_images * cfg.num_image_tokens
    if found != expected:
        raise ValueError(
            f"image tokens and image features do not match: input_ids hold {found} image tokens "
            f"(id {cfg.image_token_id}) but {num_images} image(s) give {expected} features "
            f"({cfg.num_image_tokens} per image, vision_feature_select_strategy="
            f"{cfg.vision_feature_select_strategy!r})")


class MultiModalProjector(nn.Module):
    out_features: int
    act: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        x = activation(self.act)(nn.Dense(self.out_features, name="linear_1", **kw)(x))
        return nn.Dense(self.out_features, name="linear_2", **kw)(x)


def feature_indices(layer: Union[int, Sequence[int]], num_layers: int) -> tuple[int, ...]:
    """Indices into the vision tower's hidden states (0 = embeddings) of `vision_feature_layer`
    (negative counts from the end, as in transformers); ValueError when out of range."""
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    idx = tuple(l if l >= 0 else num_layers + 1 + l for l in layers)
    for l, i in zip(layers, idx):
        if not 0 <= i <= num_layers:
            raise ValueError(f"vision_feature_layer {l} out of range for {num_layers} vision layers")
    return idx


class LlavaModel(nn.Module):
    cfg: LlavaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False  # per-decoder-layer rematerialisation (PPO update memory)

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = CLIPVisionTransformer(c.vision, **kw)
        self.multi_modal_projector = MultiModalProjector(c.text.hidden_size, c.projector_hidden_act,
                                                         c.projector_bias, **kw)
        self.language_model = LlamaModel(c.text, c.lora, remat=self.remat, **kw)
        if not c.text.tie_word_embeddings:
            self.lm_head = nn.Dense(c.text.vocab_size, use_bias=False, **kw)
        self.value_head = nn.Dense(1, kernel_init=nn.initializers.zeros, **kw)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[N_img, 3, H, W] -> projected features [N_img, num_image_tokens, D_text]."""
        c = self.cfg
        idx = feature_indices(c.vision_feature_layer, c.vision.num_hidden_layers)
        run = c.vision.num_hidden_layers if self.is_initializing() else max(idx)
        hidden, _ = self.vision_tower(pixel_values, num_layers=run)
        feats = jnp.concatenate([hidden[i] for i in idx], axis=-1)
        if c.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def embed_inputs(self, input_ids: jax.Array, pixel_values: Optional[jax.Array] = None,
                     image_features: Optional[jax.Array] = None, image_mask: Optional[jax.Array] = None) -> jax.Array:
        """Token embeddings with image features placed, in order, at the image-token positions.

        input_ids [B,T]; pixel_values [N_img,3,H,W] (images in row-major order of their tokens).
        image_mask [B,T] (default: input_ids == image_token_id) says which positions take image
        features; elsewhere an image-token id is embedded like any token, as transformers does
        for one the model generates."""
        c = self.cfg
        is_img = input_ids == c.image_token_id if image_mask is None else image_mask.astype(bool)
        concrete = not isinstance(input_ids, jax.core.Tracer) and not isinstance(is_img, jax.core.Tracer)
        if concrete and (pixel_values is not None or image_features is None):
            n = 0 if pixel_values is None else pixel_values.shape[0]
            if n or np.asarray(is_img).any():
                check_image_tokens(np.where(np.asarray(is_img), c.image_token_id, -1), n, c)
        # ids outside the text vocabulary (an image token id past it) embed as 0, then get replaced
        embeds = self.language_model.embed(jnp.where(input_ids < c.text.vocab_size, input_ids, 0))
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is None:
            return embeds
        flat = image_features.reshape(-1, image_features.shape[-1]).astype(embeds.dtype)
        b, t = input_ids.shape
        order = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32)) - 1
        placed = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(b, t, -1)
        return jnp.where(is_img[..., None], placed, embeds)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """[B,T,D] -> float32 logits [B,T,V]."""
        if self.cfg.text.tie_word_embeddings:
            return self.language_model.logits(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def values(self, hidden: jax.Array) -> jax.Array:
        """Value head on the final hidden state: [B,T,D] -> [B,T] float32."""
        return self.value_head(hidden)[..., 0].astype(jnp.float32)

    def forward(self, input_ids: jax.Array, pixel_values: Optional[jax.Array] = None,
                attention_mask: Optional[jax.Array] = None, position_ids: Optional[jax.Array] = None,
                cache: Optional[KVCache] = None, key_mask: Optional[jax.Array] = None,
                use_lora: bool = True, deterministic: bool = True,
                image_features: Optional[jax.Array] = None, logits_from: int = 0,
                image_mask: Optional[jax.Array] = None) -> dict:
        """Full output: {'logits' [B,T-logits_from,V] f32, 'values' [B,T] f32, 'hidden' [B,T,D], 'cache'}.

        attention_mask [B,T] marks real tokens of `input_ids` (left padding = 0).
        With a cache of S slots, `key_mask` [B,S] marks valid cache slots (defaults to
        the attention mask when there is no cache). `logits_from` (static) skips the LM head
        on earlier positions (the vocabulary projection of a 600-token image prompt is
        large and mostly unused)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        if key_mask is None:
            if cache is not None:
                raise ValueError("key_mask [B, cache_len] is required when a cache is given")
            key_mask = attention_mask
        embeds = self.embed_inputs(input_ids, pixel_values, image_features, image_mask)
        hidden, cache = self.language_model(embeds, position_ids, key_mask, cache, use_lora, deterministic)
        return {"logits": self.lm_logits(hidden[:, logits_from:]), "values": self.values(hidden), "hidden": hidden,
                "cache": cache}

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                 use_lora: bool = True, deterministic: bool = True):
        """Logits [B,T,V] (float32)."""
        return self.forward(input_ids, pixel_values, attention_mask, position_ids,
                            use_lora=use_lora, deterministic=deterministic)["logits"]


def from_hf(path, dtype: Any = jnp.float32, param_dtype: Any = None, lora=None, lora_key=None):
    """(LlavaModel, params) from a Hugging Face LLaVA folder or a folder written by tools/convert_hf.py.

    `lora` (a `LoRAConfig`) adds fresh adapters (B = 0) initialised from `lora_key`; the value
    head starts at zero."""
    from fisao_jax.models import hf_io

    return hf_io.load_model(path, expect="llava", dtype=dtype, param_dtype=param_dtype, lora=lora,
                            lora_key=lora_key)
