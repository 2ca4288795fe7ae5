"""Jitted rollout for LLaVA: prefill (image + left-padded prompt) then KV-cache decode loops.

`make_rollout(model, cfg)` returns one compiled function
    rollout(params, input_ids [B,T], attention_mask [B,T], pixel_values [N_img,3,H,W], key)
      -> Rollout(tokens [B,N], mask [B,N], logprobs [B,N], values [B,N])
with N = cfg.max_new_tokens fixed. Rows stop at EOS (the EOS token is part of the response,
mask 1; later slots hold `pad_token_id`, mask 0) and decoding ends as soon as every row has
stopped. Decoding runs in loops of `cfg.decode_chunk` steps whose KV cache holds the slots
written by the loop's end (grown between loops), so early steps do not attend over empty
slots. `logprobs` are log pi(token | prefix) in nats under logits / temperature, i.e. what a
teacher-forced forward pass gives (see `response_logprobs`); `values` are the value head at
the position that predicts each token.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fisao_jax.models.llama import init_cache
from fisao_jax.models.llava import LlavaModel
from fisao_jax.models.vlm import check_image_tokens, default_position_ids


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. greedy=True ignores temperature / top_k / top_p for the choice of token."""

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Decode in loops of this many steps over a cache that grows by as many slots between them:
    # a step attends over every slot of its cache, so the early steps skip the ones not yet
    # written. Each loop compiles on its own (ceil(max_new_tokens / decode_chunk) loop bodies).
    # 0 = one loop over a cache of prompt + max_new_tokens slots.
    decode_chunk: int = 128


class Rollout(NamedTuple):
    tokens: jax.Array    # [B, N] int32
    mask: jax.Array      # [B, N] int32, 1 up to and including EOS
    logprobs: jax.Array  # [B, N] float32, nats
    values: jax.Array    # [B, N] float32


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) set to -inf.  logits [B, V] float32."""
    neg = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass strictly before it is < top_p (so at least one is kept)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def first_argmax(x: jax.Array) -> jax.Array:
    """Index [B] int32 of the first maximum of x [B, V], as `jnp.argmax` (NaN rows give V - 1).

    Two plain reductions (max, then the smallest index holding it): XLA's CPU backend runs
    `jnp.argmax`'s single (value, index) reduction unvectorised (over a 32k vocabulary at batch
    32, 2.2 ms per decode step)."""
    v = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(x == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(idx, v - 1).astype(jnp.int32)


def sample_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """(token [B] int32, log-prob [B] under logits / temperature) from logits [B, V]."""
    scaled = logits.astype(jnp.float32) / cfg.temperature
    if cfg.greedy:
        token = first_argmax(logits)
    else:
        # Gumbel-max, as jax.random.categorical (same draws for a key), with the fast argmax
        gumbel = jax.random.gumbel(key, scaled.shape, scaled.dtype)
        token = first_argmax(filter_logits(scaled, cfg.top_k, cfg.top_p) + gumbel)
    # log-softmax at the chosen token only: no [B, V] log-prob array is written per step
    chosen = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
    return token, chosen - jax.nn.logsumexp(scaled, axis=-1)


def validate_inputs(model: LlavaModel, input_ids, attention_mask, pixel_values, cfg: SamplingConfig) -> None:
    """Host-side checks before compiling: context length, image tokens, shapes."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    if np.asarray(attention_mask).shape != ids.shape:
        raise ValueError(f"attention_mask shape {np.asarray(attention_mask).shape} != input_ids shape {ids.shape}")
    limit = model.cfg.text.max_position_embeddings
    if ids.shape[1] + cfg.max_new_tokens > limit:
        raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {cfg.max_new_tokens} = "
                         f"{ids.shape[1] + cfg.max_new_tokens} exceeds the model's context of {limit} tokens")
    n_img = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    check_image_tokens(ids, n_img, model.cfg)
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.decode_chunk < 0:
        raise ValueError(f"decode_chunk must be >= 0 (0 = one decode loop), got {cfg.decode_chunk}")


def _rollout(model: LlavaModel, cfg: SamplingConfig, mesh: Optional[Mesh], params, input_ids, attention_mask,
             pixel_values, key, use_lora: bool = True) -> Rollout:
    b, t = input_ids.shape
    n = cfg.max_new_tokens
    # Step i (1-based, i < n) writes slot t + i - 1 and attends over slots < t + i: the loop that
    # ends at step `stop` needs a cache of t + stop slots.
    chunk = cfg.decode_chunk if cfg.decode_chunk > 0 else n
    stops = [*range(chunk, n, chunk), n]

    spec = None
    if mesh is not None:
        batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
        tensor = mesh.shape.get("tensor", 1)
        heads = "tensor" if tensor > 1 and model.cfg.text.num_key_value_heads % tensor == 0 else None
        spec = NamedSharding(mesh, P(batch_axes, heads, None, None))

    def grow(cache, slots):
        """The cache padded to `slots` slots (a copy, once per loop), kept on the mesh's layout."""
        def one(c):
            c = jnp.pad(c, ((0, 0), (0, 0), (0, slots - c.shape[2]), (0, 0)))
            return c if spec is None else jax.lax.with_sharding_constraint(c, spec)
        return {**cache, "k": tuple(map(one, cache["k"])), "v": tuple(map(one, cache["v"]))}

    cache = grow(init_cache(model.cfg.text, b, t + stops[0], model.dtype), t + stops[0])
    key_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((b, n), jnp.int32)], axis=1)
    pos = default_position_ids(attention_mask)
    out = model.apply({"params": params}, input_ids, pixel_values, attention_mask, pos, cache,
                      key_mask[:, :t + stops[0]], use_lora=use_lora, logits_from=t - 1, method=LlavaModel.forward)
    next_pos = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)  # [B]

    key, sub = jax.random.split(key)
    tok, logp = sample_token(out["logits"][:, -1], sub, cfg)
    init = dict(
        step=jnp.ones((), jnp.int32), cache=out["cache"], token=tok, pos=next_pos, key=key,
        done=tok == cfg.eos_token_id,
        tokens=jnp.full((b, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok),
        mask=jnp.zeros((b, n), jnp.int32).at[:, 0].set(1),
        logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp),
        values=jnp.zeros((b, n), jnp.float32).at[:, 0].set(out["values"][:, -1]),
    )

    def body(key_mask, s):
        o = model.apply({"params": params}, s["token"][:, None], None, jnp.ones((b, 1), jnp.int32),
                        s["pos"][:, None], s["cache"], key_mask, use_lora=use_lora, method=LlavaModel.forward)
        k, sub = jax.random.split(s["key"])
        tok, logp = sample_token(o["logits"][:, -1], sub, cfg)
        alive = ~s["done"]
        tok = jnp.where(alive, tok, cfg.pad_token_id)
        i = s["step"]
        upd = lambda arr, v: jax.lax.dynamic_update_slice(arr, v[:, None].astype(arr.dtype), (0, i))  # noqa: E731
        return dict(
            step=i + 1, cache=o["cache"], token=tok, pos=s["pos"] + 1, key=k,
            done=s["done"] | (tok == cfg.eos_token_id),
            tokens=upd(s["tokens"], tok),
            mask=upd(s["mask"], alive.astype(jnp.int32)),
            logprobs=upd(s["logprobs"], jnp.where(alive, logp, 0.0)),
            values=upd(s["values"], jnp.where(alive, o["values"][:, -1], 0.0)),
        )

    s = init
    for j, stop in enumerate(stops):
        if j > 0:
            s = {**s, "cache": grow(s["cache"], t + stop)}
        s = jax.lax.while_loop(lambda s, stop=stop: (s["step"] < stop) & ~jnp.all(s["done"]),
                               functools.partial(body, key_mask[:, :t + stop]), s)
    return Rollout(s["tokens"], s["mask"], s["logprobs"], s["values"])


def make_rollout(model: LlavaModel, cfg: SamplingConfig, mesh: Optional[Mesh] = None, use_lora: bool = True):
    """A jitted `rollout(params, input_ids, attention_mask, pixel_values, key) -> Rollout` that
    validates its inputs on the host before compiling. See the module docstring."""
    jitted = jax.jit(lambda params, ids, mask, pix, key: _rollout(model, cfg, mesh, params, ids, mask, pix, key,
                                                                  use_lora))

    def rollout(params, input_ids, attention_mask, pixel_values, key) -> Rollout:
        validate_inputs(model, input_ids, attention_mask, pixel_values, cfg)
        return jitted(params, input_ids, attention_mask, pixel_values, key)

    rollout.jitted = jitted
    return rollout


def response_logprobs(model: LlavaModel, params: Any, input_ids, attention_mask, pixel_values, tokens, mask,
                      temperature: float = 1.0, use_lora: bool = True, deterministic: bool = True,
                      rngs: Optional[dict] = None):
    """Teacher-forced pass over prompt + response.

    Returns dict(logprobs [B,N] (0 where mask is 0), values [B,N], logits [B,N,V]) for response
    `tokens` [B,N] after a left-padded prompt [B,T]."""
    t = input_ids.shape[1]
    full_ids = jnp.concatenate([input_ids, tokens], axis=1)
    full_mask = jnp.concatenate([attention_mask, mask], axis=1).astype(jnp.int32)
    # image features go to the prompt's image tokens only, never to a generated image-token id
    image_mask = jnp.concatenate([input_ids == model.cfg.image_token_id, jnp.zeros(tokens.shape, bool)], axis=1)
    out = model.apply({"params": params}, full_ids, pixel_values, full_mask, use_lora=use_lora,
                      deterministic=deterministic, logits_from=t - 1, image_mask=image_mask,
                      method=LlavaModel.forward, rngs=rngs)
    logits = out["logits"][:, :-1] / temperature  # position i predicts token i+1
    logp = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return {"logprobs": jnp.where(mask > 0, lp, 0.0), "values": jnp.where(mask > 0, out["values"][:, t - 1:-1], 0.0),
            "logits": logits}
