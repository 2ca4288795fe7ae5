"""CLIP vision and text towers (flax.linen), parameter names as in transformers.

`CLIPModel.encode_image(pixel_values [B,3,H,W]) -> [B, P]` and
`CLIPModel.encode_text(input_ids [B,L], attention_mask [B,L]) -> [B, P]` return the projected,
unnormalised embeddings (transformers' `get_image_features` / `get_text_features`).
The vision transformer also returns every hidden state, so one pass can feed both LLaVA's
projector (a middle layer's patch features) and the verifier (pooled, projected CLS).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fisao_jax.models.configs import CLIPConfig, CLIPTextConfig, CLIPVisionConfig


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        """x [B,T,D]; mask [B,1,T,T] bool (True = attend) or None."""
        b, t, d = x.shape
        dh = d // self.num_heads
        dense = lambda n: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=n)  # noqa: E731
        q = dense("q_proj")(x).reshape(b, t, self.num_heads, dh) * (dh ** -0.5)
        k = dense("k_proj")(x).reshape(b, t, self.num_heads, dh)
        v = dense("v_proj")(x).reshape(b, t, self.num_heads, dh)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return dense("out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    eps: float
    act: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(self.eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, name="self_attn", **kw)(h, mask)
        h = nn.LayerNorm(self.eps, name="layer_norm2", **kw)(x)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.act, name="mlp", **kw)(h)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    act: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = activation(self.act)(nn.Dense(self.intermediate_size, name="fc1", **kw)(x))
        return nn.Dense(self.hidden_size, name="fc2", **kw)(x)


class CLIPEncoder(nn.Module):
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    eps: float
    act: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, num_layers: Optional[int] = None):
        """Returns the tuple of hidden states: (input, after layer 1, ..., after layer n).

        `num_layers` < total runs only the first layers (LLaVA never needs the last one when
        vision_feature_layer is -2)."""
        hidden = [x]
        for i in range(self.num_layers if num_layers is None else num_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads, self.eps,
                                 self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"layers_{i}")(x, mask)
            hidden.append(x)
        return tuple(hidden)


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (conv, no bias) + class token + learned positions."""

    cfg: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B,3,H,W] -> [B, 1+N, D]."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NHWC for lax.conv
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", use_bias=False, name="patch_embedding", **kw)(x)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        pos = nn.Embed(c.num_patches + 1, c.hidden_size, name="position_embedding", **kw)(jnp.arange(x.shape[1]))
        return x + pos[None]



class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionTransformer (the `vision_model` / LLaVA `vision_tower`)."""

    cfg: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, num_layers: Optional[int] = None):
        """pixel_values [B,3,H,W] -> (hidden_states tuple of [B,1+N,D], pooled [B,D] or None).

        pooled (post-LN CLS) is only computed when all layers run."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        x = nn.LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        hidden = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                             c.layer_norm_eps, c.hidden_act, name="encoder", **kw)(x, None, num_layers)
        post_ln = nn.LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)
        if num_layers is not None and num_layers < c.num_hidden_layers:
            return hidden, None
        return hidden, post_ln(hidden[-1][:, 0])


class CLIPTextEmbeddings(nn.Module):
    cfg: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """[B,L] -> [B,L,D]: token + learned position embeddings."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        return x + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding",
                            **kw)(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    cfg: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """input_ids [B,L] -> pooled [B,D]: final-LN hidden state at the EOS position."""
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t = input_ids.shape
        x = CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids)
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        hidden = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                             c.layer_norm_eps, c.hidden_act, name="encoder", **kw)(x, mask)
        x = nn.LayerNorm(c.layer_norm_eps, name="final_layer_norm", **kw)(hidden[-1])
        if c.argmax_pooling or (c.argmax_pooling is None and c.eos_token_id == 2):
            # Legacy configs: transformers pools at the highest token id (the EOS of the original vocab).
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        return x[jnp.arange(b), eos_pos]


class CLIPModel(nn.Module):
    """Both towers, projections and logit scale (transformers' `CLIPModel`)."""

    cfg: CLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = CLIPVisionTransformer(self.cfg.vision, **kw)
        self.text_model = CLIPTextTransformer(self.cfg.text, **kw)
        self.visual_projection = nn.Dense(self.cfg.projection_dim, use_bias=False, **kw)
        self.text_projection = nn.Dense(self.cfg.projection_dim, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        """[B,3,H,W] -> [B, projection_dim] (unnormalised)."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def encode_text(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """[B,L] -> [B, projection_dim] (unnormalised)."""
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        """CLIP logits_per_image [B_img, B_txt] = exp(logit_scale) * cos."""
        img = normalize(self.encode_image(pixel_values))
        txt = normalize(self.encode_text(input_ids, attention_mask))
        return jnp.exp(self.logit_scale) * img @ txt.T


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """L2-normalise the last axis (in float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
