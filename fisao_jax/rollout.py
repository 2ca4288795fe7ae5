"""Sampling from a policy: prefill the prompt (with its image features), then KV-cache decode
loops with a pluggable stop rule. The rollout (FiSAO, evaluation, ViGoR) stops rows at EOS;
CSR's sentence sampler stops them at a sentence end (`methods/csr_search.py`).

`make_rollout(model, cfg, layout)` returns one compiled function
    rollout(params, batch, key) -> Rollout(tokens [B, N], mask [B, N], logprobs [B, N])
with N = cfg.max_new_tokens fixed and `batch` = {'input_ids', 'attention_mask' [B, T] (left
padded), the policy's image inputs}. A row stops at its stop token (part of the response,
mask 1; later slots hold `pad_token_id`, mask 0) and decoding ends as soon as every row has
stopped. Decoding runs in loops of `cfg.decode_chunk` steps whose KV cache holds the slots
written by the loop's end (grown between loops), so early steps do not attend over empty
slots. `logprobs` are log pi(token | prefix) in nats under logits / temperature; the trainers
take the log-probs they optimise from a teacher-forced pass (`fisao_jax.policy`), which is
the same function of the tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from fisao_jax.models.llama import init_cache
from fisao_jax.models.vlm import VisionLanguageModel, check_image_tokens, default_position_ids
from fisao_jax.policy import image_features
from fisao_jax.sharding import kv_cache_sharding


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
    mask: jax.Array      # [B, N] int32, 1 up to and including the stop token
    logprobs: jax.Array  # [B, N] float32, nats


StopRule = Callable[[jax.Array, jax.Array], jax.Array]
"""stop(token [B] int32, count) -> [B] bool: the row ends with this token; `count` is how many
tokens the row has sampled, this one included (a scalar int32)."""


def eos_stop(eos_token_id: int) -> StopRule:
    return lambda token, count: token == eos_token_id


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


def sample_token(logits: jax.Array, key: jax.Array, cfg: SamplingConfig,
                 logprob_temperature: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
    """(token [B] int32, its log-prob [B]) from logits [B, V]; the log-prob is taken under
    logits / logprob_temperature (default: the sampling temperature)."""
    scaled = logits.astype(jnp.float32) / cfg.temperature
    if cfg.greedy:
        token = first_argmax(logits)
    else:
        # Gumbel-max, as jax.random.categorical (same draws for a key), with the fast argmax
        gumbel = jax.random.gumbel(key, scaled.shape, scaled.dtype)
        token = first_argmax(filter_logits(scaled, cfg.top_k, cfg.top_p) + gumbel)
    if logprob_temperature is not None and logprob_temperature != cfg.temperature:
        scaled = logits.astype(jnp.float32) / logprob_temperature
    # log-softmax at the chosen token only: no [B, V] log-prob array is written per step
    chosen = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
    return token, chosen - jax.nn.logsumexp(scaled, axis=-1)


def _local_rows(x) -> np.ndarray:
    """The rows of `x` this process can read (all of them, but for a global array spanning
    several processes: its first addressable shard)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


def validate_inputs(model: VisionLanguageModel, batch: dict, cfg: SamplingConfig) -> None:
    """Host-side checks before compiling: context length, image tokens, shapes, settings."""
    shape = np.shape(batch["input_ids"])
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {shape}")
    if np.shape(batch["attention_mask"]) != shape:
        raise ValueError(f"attention_mask shape {np.shape(batch['attention_mask'])} != input_ids shape {shape}")
    limit = model.cfg.text.max_position_embeddings
    if shape[1] + cfg.max_new_tokens > limit:
        raise ValueError(f"prompt length {shape[1]} + max_new_tokens {cfg.max_new_tokens} = "
                         f"{shape[1] + cfg.max_new_tokens} exceeds the model's context of {limit} tokens")
    ids, images = batch["input_ids"], batch[model.image_input_keys[0]]
    if np.shape(images)[0] == shape[0]:  # one image per row: the check can run on the rows at hand
        ids, n_images = _local_rows(ids), len(_local_rows(images))
    else:
        ids, n_images = np.asarray(ids), int(np.shape(images)[0])
    check_image_tokens(ids, n_images, model.cfg)
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.decode_chunk < 0:
        raise ValueError(f"decode_chunk must be >= 0 (0 = one decode loop), got {cfg.decode_chunk}")


def decode(model: VisionLanguageModel, cfg: SamplingConfig, params: Any, input_ids: jax.Array,
           attention_mask: jax.Array, features: Optional[jax.Array], key: jax.Array, *,
           stop: Optional[StopRule] = None, alive: Optional[jax.Array] = None, max_tokens: Optional[int] = None,
           image_mask: Optional[jax.Array] = None, use_lora: bool = True,
           cache_sharding: Optional[NamedSharding] = None, logprob_temperature: Optional[float] = None) -> Rollout:
    """Continue each left-padded row of `input_ids` [B, T] (image `features` at the positions
    `image_mask` marks, default the image tokens) by up to `max_tokens` (default
    cfg.max_new_tokens) sampled tokens, ending a row where `stop` (default: EOS) says so.
    `alive` [B] bool (default all) marks rows that sample at all. Traceable (call under jit)."""
    b, t = input_ids.shape
    n = max_tokens or cfg.max_new_tokens
    stop = stop or eos_stop(cfg.eos_token_id)
    alive = jnp.ones((b,), bool) if alive is None else alive
    # Step i (1-based, i < n) writes slot t + i - 1 and attends over slots < t + i: the loop that
    # ends at step `end` needs a cache of t + end slots.
    chunk = cfg.decode_chunk if cfg.decode_chunk > 0 else n
    ends = [*range(chunk, n, chunk), n]

    def grow(cache, slots):
        """The cache padded to `slots` slots (a copy, once per loop), kept on the mesh's layout."""
        def one(c):
            c = jnp.pad(c, ((0, 0), (0, 0), (0, slots - c.shape[2]), (0, 0)))
            return c if cache_sharding is None else jax.lax.with_sharding_constraint(c, cache_sharding)
        return {**cache, "k": tuple(map(one, cache["k"])), "v": tuple(map(one, cache["v"]))}

    cache = grow(init_cache(model.cfg.text, b, t + ends[0], model.dtype), t + ends[0])
    key_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((b, n), jnp.int32)], axis=1)
    out = model.apply({"params": params}, input_ids, features, attention_mask, default_position_ids(attention_mask),
                      cache, key_mask[:, :t + ends[0]], use_lora=use_lora, logits_from=t - 1, image_mask=image_mask,
                      method=model.forward)
    key, sub = jax.random.split(key)
    tok, logp = sample_token(out["logits"][:, -1], sub, cfg, logprob_temperature)
    tok = jnp.where(alive, tok, cfg.pad_token_id)
    one = jnp.ones((), jnp.int32)
    state = dict(
        step=one, cache=out["cache"], token=tok, key=key,
        pos=jnp.sum(attention_mask, axis=-1).astype(jnp.int32),  # [B] position of the next token
        done=~alive | stop(tok, one),
        tokens=jnp.full((b, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok),
        mask=jnp.zeros((b, n), jnp.int32).at[:, 0].set(alive.astype(jnp.int32)),
        logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(jnp.where(alive, logp, 0.0)),
    )

    def body(key_mask, s):
        # Tie the weights to the loop: XLA would otherwise hoist their (FSDP) all-gathers out of it
        # as loop-invariant and keep the whole gathered model in memory next to the KV cache.
        p, s = jax.lax.optimization_barrier((params, s))
        o = model.apply({"params": p}, s["token"][:, None], None, jnp.ones((b, 1), jnp.int32),
                        s["pos"][:, None], s["cache"], key_mask, use_lora=use_lora, method=model.forward)
        k, sub = jax.random.split(s["key"])
        tok, logp = sample_token(o["logits"][:, -1], sub, cfg, logprob_temperature)
        live = ~s["done"]
        tok = jnp.where(live, tok, cfg.pad_token_id)
        i = s["step"]
        upd = lambda arr, v: jax.lax.dynamic_update_slice(arr, v[:, None].astype(arr.dtype), (0, i))  # noqa: E731
        return dict(step=i + 1, cache=o["cache"], token=tok, pos=s["pos"] + 1, key=k,
                    done=s["done"] | stop(tok, i + 1), tokens=upd(s["tokens"], tok),
                    mask=upd(s["mask"], live.astype(jnp.int32)),
                    logprobs=upd(s["logprobs"], jnp.where(live, logp, 0.0)))

    for j, end in enumerate(ends):
        if j > 0:
            state = {**state, "cache": grow(state["cache"], t + end)}
        state = jax.lax.while_loop(lambda s, end=end: (s["step"] < end) & ~jnp.all(s["done"]),
                                   functools.partial(body, key_mask[:, :t + end]), state)
    return Rollout(state["tokens"], state["mask"], state["logprobs"])


def make_rollout(model: VisionLanguageModel, cfg: SamplingConfig, layout=None, param_shardings: Any = None,
                 use_lora: bool = True):
    """A compiled `rollout(params, batch, key) -> Rollout` (see the module docstring) that
    validates its inputs on the host first. With a `fisao_jax.placement.Layout`, the batch
    and the result are sharded over the batch axes (params by `param_shardings`, or as given)."""

    def run(params, batch, key):
        feats = image_features(model, params, batch)
        sharding = None if layout is None else kv_cache_sharding(layout.mesh, model.cfg.text.num_key_value_heads)
        return decode(model, cfg, params, batch["input_ids"], batch["attention_mask"], feats, key,
                      use_lora=use_lora, cache_sharding=sharding)

    if layout is None:
        jitted = jax.jit(run)
    else:
        jitted = layout.jit(run, in_shardings=(param_shardings, layout.batch, layout.replicated),
                            out_shardings=layout.batch)

    def rollout(params, batch, key) -> Rollout:
        validate_inputs(model, batch, cfg)
        return jitted(params, batch, key)

    rollout.jitted = jitted
    return rollout

