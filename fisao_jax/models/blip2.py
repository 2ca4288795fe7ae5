"""BLIP-2 building blocks (flax.linen): the ViT-g vision transformer, the Q-Former and BLIP-2's
image-text retrieval model. Parameter names and shapes are transformers' (Dense kernels are
[in, out], conv kernels HWIO, `layers_N` / `layer_N` for `layers.N` / `layer.N`).

    BlipVisionTransformer(pixel_values [B,3,H,W]) -> post-LN hidden states [B, 1+N, D_v]
    InstructBlipQFormer(queries [B,Q,D], input_ids [B,L], mask [B,L], image [B,1+N,D_v]) -> [B, Q+L, D]
    Blip2RetrievalModel.encode_image(pixel_values) -> [B, Q, P]  (L2-normalised, per query)
    Blip2RetrievalModel.encode_text(input_ids, mask) -> [N, P]  (L2-normalised [CLS])
    Blip2RetrievalModel(pixel_values, input_ids, mask) -> ITC scores [B, N] = max_q cos

InstructBLIP feeds its instruction to the Q-Former with the queries (one module, embeddings
and LayerNorm inside: `qformer.embeddings.*`); BLIP-2 keeps the text embeddings outside the
Q-Former (`embeddings.*`) and the LayerNorm inside (`qformer.layernorm`). Both compute
LayerNorm(concat(queries, word + position embeddings)).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fisao_jax.models.blip_configs import Blip2RetrievalConfig, BlipVisionConfig, QFormerConfig
from fisao_jax.models.clip import activation, normalize


def _layer_norm(eps: float, name: str, dtype, param_dtype) -> nn.LayerNorm:
    # two-pass variance as torch computes it: ViT-g has a few very large activation channels
    return nn.LayerNorm(eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array] = None) -> jax.Array:
    """Softmax attention. q [B,T,H,Dh], k/v [B,S,H,Dh], key_mask [B,S] (True = attend) -> [B,T,H*Dh].

    Scores scaled after the product and soft-maxed in float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (q.shape[-1] ** -0.5)
    if key_mask is not None:
        scores = jnp.where(key_mask.astype(bool)[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(*out.shape[:2], -1)


# ----------------------------------------------------------------------------- vision

class BlipAttention(nn.Module):
    """Self-attention with one fused `qkv` projection ([3, H, Dh] output layout) and `projection`."""

    cfg: BlipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,T,D] -> [B,T,D]."""
        c = self.cfg
        b, t, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = nn.Dense(3 * d, use_bias=c.qkv_bias, name="qkv", **kw)(x)
        qkv = qkv.reshape(b, t, 3, c.num_attention_heads, d // c.num_attention_heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return nn.Dense(d, name="projection", **kw)(out)


class BlipMLP(nn.Module):
    cfg: BlipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(self.cfg.hidden_act)(nn.Dense(self.cfg.intermediate_size, name="fc1", **kw)(x))
        return nn.Dense(self.cfg.hidden_size, name="fc2", **kw)(h)


class BlipEncoderLayer(nn.Module):
    """Pre-norm transformer layer."""

    cfg: BlipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + BlipAttention(c, name="self_attn", **kw)(_layer_norm(c.layer_norm_eps, "layer_norm1", **kw)(x))
        return x + BlipMLP(c, name="mlp", **kw)(_layer_norm(c.layer_norm_eps, "layer_norm2", **kw)(x))


class BlipEncoder(nn.Module):
    cfg: BlipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.cfg.num_hidden_layers):
            x = BlipEncoderLayer(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(x)
        return x


class BlipVisionEmbeddings(nn.Module):
    """Patch conv (with bias) + class embedding [1,1,D] + learned positions [1,1+N,D]."""

    cfg: BlipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B,3,H,W] -> [B, 1+N, D]."""
        c = self.cfg
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NHWC for lax.conv
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", name="patch_embedding", dtype=self.dtype,
                          param_dtype=self.param_dtype)(x)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        init = nn.initializers.normal(0.02)
        cls = self.param("class_embedding", init, (1, 1, c.hidden_size), self.param_dtype)
        pos = self.param("position_embedding", init, (1, c.num_patches + 1, c.hidden_size), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        return x + pos[:, :x.shape[1]].astype(self.dtype)


class BlipVisionTransformer(nn.Module):
    """transformers' Blip2VisionModel / InstructBlipVisionModel (the `vision_model`)."""

    cfg: BlipVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B,3,H,W] -> last hidden state after `post_layernorm`, [B, 1+N, D] (what the
        Q-Former cross-attends to)."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BlipVisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        x = BlipEncoder(c, name="encoder", **kw)(x)
        return _layer_norm(c.layer_norm_eps, "post_layernorm", **kw)(x)


# ----------------------------------------------------------------------------- Q-Former

class QFormerMultiHeadAttention(nn.Module):
    """BERT attention projections `query`, `key`, `value` (keys/values from `context` when given)."""

    cfg: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: Optional[jax.Array], context: Optional[jax.Array] = None):
        """x [B,T,D]; context [B,S,D_ctx] or None (self-attention); key_mask [B,S] or None -> [B,T,D]."""
        c = self.cfg
        src = x if context is None else context
        h, dh = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        dense = lambda n: nn.Dense(h * dh, dtype=self.dtype, param_dtype=self.param_dtype, name=n)  # noqa: E731
        split = lambda a: a.reshape(*a.shape[:2], h, dh)  # noqa: E731
        return attention(split(dense("query")(x)), split(dense("key")(src)), split(dense("value")(src)), key_mask)


class QFormerAddNorm(nn.Module):
    """`dense` then LayerNorm(result + residual): BERT's SelfOutput / Output."""

    features: int
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.Dense(self.features, name="dense", **kw)(x)
        return _layer_norm(self.eps, "LayerNorm", **kw)(y + residual)


class QFormerAttention(nn.Module):
    """`attention` (projections) + `output` (dense, residual, LayerNorm)."""

    cfg: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a = QFormerMultiHeadAttention(self.cfg, name="attention", **kw)(x, key_mask, context)
        return QFormerAddNorm(self.cfg.hidden_size, self.cfg.layer_norm_eps, name="output", **kw)(a, x)


class QFormerIntermediate(nn.Module):
    cfg: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")
        return activation(self.cfg.hidden_act)(dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over queries and text; cross-attention to the image for the query
    positions only (layers with index % cross_attention_frequency == 0); separate
    feed-forward layers for queries (`*_query`) and text."""

    cfg: QFormerConfig
    index: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attention = QFormerAttention(c, **kw)
        if c.has_cross_attention(self.index):
            self.crossattention = QFormerAttention(c, **kw)
        self.intermediate = QFormerIntermediate(c, **kw)
        self.output = QFormerAddNorm(c.hidden_size, c.layer_norm_eps, **kw)
        self.intermediate_query = QFormerIntermediate(c, **kw)
        self.output_query = QFormerAddNorm(c.hidden_size, c.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array, key_mask: Optional[jax.Array], image_embeds: Optional[jax.Array],
                 query_length: int) -> jax.Array:
        """x [B, Q+L, D] (queries first); key_mask [B, Q+L] or None; image_embeds [B, S, D_v];
        query_length Q (static; 0 = text only) -> [B, Q+L, D]."""
        a = self.attention(x, key_mask)
        if query_length == 0:
            return self.output(self.intermediate(a), a)
        q = a[:, :query_length]
        if self.cfg.has_cross_attention(self.index):
            if image_embeds is None:
                raise ValueError(f"Q-Former layer {self.index} cross-attends to the image: image_embeds is required")
            q = self.crossattention(q, None, image_embeds)
        out = self.output_query(self.intermediate_query(q), q)
        if a.shape[1] > query_length:
            t = a[:, query_length:]
            out = jnp.concatenate([out, self.output(self.intermediate(t), t)], axis=1)
        return out


class QFormerEncoder(nn.Module):
    cfg: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, image_embeds, query_length: int):
        for i in range(self.cfg.num_hidden_layers):
            x = QFormerLayer(self.cfg, i, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"layer_{i}")(x, key_mask, image_embeds, query_length)
        return x


class QFormerEmbeddings(nn.Module):
    """Queries followed by text (word + absolute position embeddings), optionally LayerNorm'd."""

    cfg: QFormerConfig
    with_layernorm: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Optional[jax.Array] = None, query_embeds: Optional[jax.Array] = None):
        """input_ids [B,L] (positions 0..L-1 whatever the padding, as transformers), query_embeds
        [B,Q,D] -> [B, Q+L, D]."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        parts = [] if query_embeds is None else [query_embeds.astype(self.dtype)]
        if input_ids is not None:
            words = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(input_ids)
            pos = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings",
                           **kw)(jnp.arange(input_ids.shape[1]))
            parts.append(words + pos[None])
        if not parts:
            raise ValueError("Q-Former embeddings need input_ids or query_embeds")
        x = jnp.concatenate(parts, axis=1)
        return _layer_norm(c.layer_norm_eps, "layernorm", **kw)(x) if self.with_layernorm else x


def _query_key_mask(batch: int, num_queries: int, text_mask: Optional[jax.Array]) -> Optional[jax.Array]:
    """[B, Q+L] key mask: queries always attended, text by its mask; None when there is none."""
    if text_mask is None:
        return None
    return jnp.concatenate([jnp.ones((batch, num_queries), bool), text_mask.astype(bool)], axis=1)


class InstructBlipQFormer(nn.Module):
    """transformers' InstructBlipQFormerModel: `embeddings` (with LayerNorm) + `encoder`."""

    cfg: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query_embeds: jax.Array, input_ids: Optional[jax.Array] = None,
                 attention_mask: Optional[jax.Array] = None, image_embeds: Optional[jax.Array] = None):
        """query_embeds [B,Q,D], instruction input_ids / attention_mask [B,L] (right-padded, as the
        BERT tokenizer pads), image_embeds [B,S,D_v] -> hidden states [B, Q+L, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = QFormerEmbeddings(self.cfg, True, name="embeddings", **kw)(input_ids, query_embeds)
        mask = _query_key_mask(x.shape[0], query_embeds.shape[1], attention_mask if input_ids is not None else None)
        return QFormerEncoder(self.cfg, name="encoder", **kw)(x, mask, image_embeds, query_embeds.shape[1])


class Blip2QFormer(nn.Module):
    """transformers' Blip2QFormerModel: `layernorm` + `encoder` (embeddings are the caller's)."""

    cfg: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embeds: jax.Array, query_length: int, key_mask: Optional[jax.Array] = None,
                 image_embeds: Optional[jax.Array] = None) -> jax.Array:
        """embeds [B,T,D] (first `query_length` are queries), key_mask [B,T] -> [B,T,D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _layer_norm(self.cfg.layer_norm_eps, "layernorm", **kw)(embeds)
        return QFormerEncoder(self.cfg, name="encoder", **kw)(x, key_mask, image_embeds, query_length)


# ----------------------------------------------------------------------------- retrieval

def itc_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """BLIP-2's image-text contrastive score: max over queries of the cosine.
    image_embeds [B,Q,P], text_embeds [N,P] (both L2-normalised) -> [B,N] float32."""
    sims = jnp.einsum("bqp,np->bqn", image_embeds.astype(jnp.float32), text_embeds.astype(jnp.float32))
    return sims.max(axis=1)


class Blip2RetrievalModel(nn.Module):
    """transformers' Blip2ForImageTextRetrieval (vision model, query tokens, Q-Former, text
    embeddings, ITC projections and ITM head). Frozen: no LoRA, no value head."""

    cfg: Blip2RetrievalConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = BlipVisionTransformer(c.vision, **kw)
        self.query_tokens = self.param("query_tokens", nn.initializers.normal(0.02),
                                       (1, c.num_query_tokens, c.qformer.hidden_size), self.param_dtype)
        self.embeddings = QFormerEmbeddings(c.qformer, False, **kw)
        self.qformer = Blip2QFormer(c.qformer, **kw)
        self.vision_projection = nn.Dense(c.image_text_hidden_size, **kw)
        self.text_projection = nn.Dense(c.image_text_hidden_size, **kw)
        self.itm_head = nn.Dense(2, **kw)

    def _queries(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.query_tokens.astype(self.dtype), (batch,) + self.query_tokens.shape[1:])

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        """[B,3,H,W] -> L2-normalised projected query outputs [B, Q, image_text_hidden_size] float32."""
        image = self.vision_model(pixel_values)
        queries = self._queries(image.shape[0])
        out = self.qformer(queries, queries.shape[1], None, image)
        return normalize(self.vision_projection(out))

    def encode_text(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """Text alone through the Q-Former: input_ids / attention_mask [N,L] ([CLS] first, right
        padding) -> L2-normalised projected [CLS] output [N, image_text_hidden_size] float32."""
        out = self.qformer(self.embeddings(input_ids), 0, attention_mask)
        return normalize(self.text_projection(out[:, 0]))

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """ITC scores [B_img, N_txt] float32: transformers' `logits_per_image` with
        `use_image_text_matching_head=False` (plain max-over-queries cosine, no temperature)."""
        return itc_scores(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))

    def match_logits(self, pixel_values: jax.Array, input_ids: jax.Array,
                     attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """ITM logits [B, 2] (index 1 = match) for image i with text i: the `itm_head` on the
        query outputs of a joint pass, averaged over queries (transformers'
        `use_image_text_matching_head=True`)."""
        image = self.vision_model(pixel_values)
        queries = self._queries(image.shape[0])
        embeds = self.embeddings(input_ids, queries)
        mask = _query_key_mask(embeds.shape[0], queries.shape[1], attention_mask)
        out = self.qformer(embeds, queries.shape[1], mask, image)
        return self.itm_head(out[:, :queries.shape[1]]).astype(jnp.float32).mean(axis=1)

    def init_all(self, pixel_values: jax.Array, input_ids: jax.Array) -> jax.Array:
        """Touches every parameter (for `init` / `eval_shape`)."""
        return self(pixel_values, input_ids).sum() + self.match_logits(pixel_values, input_ids).sum()
