"""LLaMA decoder (RMSNorm, RoPE in transformers' rotate-half layout, SwiGLU, grouped-query
attention) with an explicit KV cache and LoRA on every linear layer.

The KV cache is a pytree passed in and returned:
  {'k': tuple of L arrays [B, KVH, S, Dh], 'v': same, 'index': int32 []}
Heads come before slots so that the attention contractions read the cache as it is: with
[B, S, KVH, Dh], XLA transposes every layer's whole cache at every decode step.
`index` is the next slot to write. A forward without a cache (training, scoring) attends over
its own keys and values and builds no cache.

Activations name their logical axes (`constrain`): under a mesh and the logical axis rules
of `fisao_jax.sharding` the batch stays on the data-parallel axes and heads / MLP units on
'tensor' through every layer; elsewhere the constraints do nothing.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fisao_jax.models.configs import LlamaConfig, LoRAConfig
from fisao_jax.models.lora import LoRADense

KVCache = dict

# logical axis names of the activations (mapped to mesh axes by fisao_jax.sharding.LOGICAL_RULES)
HIDDEN = ("batch", "length", "embed")
HEADS = ("batch", "length", "heads", "head_dim")
KV = ("batch", "length", "kv_heads", "head_dim")
CACHE = ("batch", "kv_heads", "cache_len", "head_dim")
MLP = ("batch", "length", "mlp")


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """`x` laid out by logical axis names (a no-op outside a mesh with logical rules)."""
    return nn.with_logical_constraint(x, axes)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty KV cache with room for `max_len` positions."""
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.dims_per_head)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    return {"k": zeros, "v": tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
            "index": jnp.zeros((), jnp.int32)}


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before applying the weight.
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, scaling: float = 1.0):
    """cos, sin [B, T, head_dim] for integer positions [B, T] (transformers' layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = (position_ids.astype(jnp.float32) / scaling)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, H, Dh]; rotate-half convention (first half / second half)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :].astype(x.dtype) + rotated * sin[:, :, None, :].astype(x.dtype)


def _dense(features: int, bias: bool, lora: LoRAConfig, dtype, param_dtype, name: str) -> LoRADense:
    return LoRADense(features, use_bias=bias, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                     dtype=dtype, param_dtype=param_dtype, name=name)


class LlamaAttention(nn.Module):
    cfg: LlamaConfig
    lora: LoRAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, cache_k, cache_v, index, use_lora, deterministic):
        """x [B,T,D]; key_mask [B,S] bool over cache slots; cache_k/v [B,KVH,S,Dh] or None (then S = T,
        the keys are x's own); index: first slot of x."""
        c = self.cfg
        b, t, _ = x.shape
        h, kvh, dh = c.num_attention_heads, c.num_key_value_heads, c.dims_per_head
        proj = lambda n, f: _dense(f, c.attention_bias, self.lora, self.dtype, self.param_dtype, n)  # noqa: E731
        q = constrain(proj("q_proj", h * dh)(x, use_lora, deterministic).reshape(b, t, h, dh), HEADS)
        k = constrain(proj("k_proj", kvh * dh)(x, use_lora, deterministic).reshape(b, t, kvh, dh), KV)
        v = constrain(proj("v_proj", kvh * dh)(x, use_lora, deterministic).reshape(b, t, kvh, dh), KV)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache_k is None:
            cache_k, cache_v, index = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), 0
        else:
            heads_first = lambda a: a.transpose(0, 2, 1, 3).astype(cache_k.dtype)  # noqa: E731
            cache_k = constrain(jax.lax.dynamic_update_slice(cache_k, heads_first(k), (0, 0, index, 0)), CACHE)
            cache_v = constrain(jax.lax.dynamic_update_slice(cache_v, heads_first(v), (0, 0, index, 0)), CACHE)
        s = cache_k.shape[2]

        # Causal over absolute slots, restricted to valid (non-padding) keys.
        q_slot = index + jnp.arange(t)
        allowed = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]  # [B,T,S]

        qg = q.reshape(b, t, kvh, h // kvh, dh)
        logits = jnp.einsum("btkgd,bksd->bkgts", qg, cache_k.astype(self.dtype)).astype(jnp.float32)
        logits = logits * (dh ** -0.5)
        logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, cache_v.astype(self.dtype)).reshape(b, t, h, dh)
        out = proj("o_proj", c.hidden_size)(constrain(out, HEADS).reshape(b, t, h * dh), use_lora, deterministic)
        return out, cache_k, cache_v


class LlamaMLP(nn.Module):
    cfg: LlamaConfig
    lora: LoRAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, use_lora, deterministic):
        c = self.cfg
        proj = lambda n, f: _dense(f, c.mlp_bias, self.lora, self.dtype, self.param_dtype, n)  # noqa: E731
        gate = constrain(proj("gate_proj", c.intermediate_size)(x, use_lora, deterministic), MLP)
        up = constrain(proj("up_proj", c.intermediate_size)(x, use_lora, deterministic), MLP)
        return proj("down_proj", c.hidden_size)(jax.nn.silu(gate) * up, use_lora, deterministic)


class LlamaDecoderLayer(nn.Module):
    cfg: LlamaConfig
    lora: LoRAConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, cache_k, cache_v, index, use_lora, deterministic):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a, cache_k, cache_v = LlamaAttention(self.cfg, self.lora, name="self_attn", **kw)(
            RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm", **kw)(x),
            cos, sin, key_mask, cache_k, cache_v, index, use_lora, deterministic)
        x = constrain(x + a, HIDDEN)
        m = LlamaMLP(self.cfg, self.lora, name="mlp", **kw)(
            RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x), use_lora, deterministic)
        return constrain(x + m, HIDDEN), cache_k, cache_v


class LlamaModel(nn.Module):
    """Embeddings + decoder layers + final norm. Parameter names follow transformers'."""

    cfg: LlamaConfig
    lora: LoRAConfig = LoRAConfig()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False  # recompute each layer in the backward pass (memory for compute)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size, name="embed_tokens", **kw)
        # static: use_lora, deterministic (argument 0 is the module itself)
        layer = nn.remat(LlamaDecoderLayer, static_argnums=(8, 9)) if self.remat else LlamaDecoderLayer
        self.layers = [layer(self.cfg, self.lora, name=f"layers_{i}", **kw)
                       for i in range(self.cfg.num_hidden_layers)]
        self.norm = RMSNorm(self.cfg.rms_norm_eps, name="norm", **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, key_mask: jax.Array,
                 cache: Optional[KVCache] = None, use_lora: bool = True, deterministic: bool = True):
        """inputs_embeds [B,T,D], position_ids [B,T], key_mask [B,S] (valid cache slots, or [B,T]
        without a cache). Returns (hidden [B,T,D] after the final norm, new cache or None)."""
        t = inputs_embeds.shape[1]
        cos, sin = rope_cos_sin(position_ids, self.cfg.dims_per_head, self.cfg.rope_theta,
                                self.cfg.rope_scaling_factor)
        key_mask = key_mask.astype(bool)
        x = constrain(inputs_embeds.astype(self.dtype), HIDDEN)
        if cache is None:
            for layer in self.layers:
                x, _, _ = layer(x, cos, sin, key_mask, None, None, 0, use_lora, deterministic)
            return self.norm(x), None
        index = cache["index"]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, ck, cv = layer(x, cos, sin, key_mask, cache["k"][i], cache["v"][i], index, use_lora, deterministic)
            new_k.append(ck)
            new_v.append(cv)
        new_cache = {"k": tuple(new_k), "v": tuple(new_v), "index": index + t}
        return self.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Tied-embedding logits [B,T,V] (used when tie_word_embeddings)."""
        return self.embed_tokens.attend(hidden)
