"""The FiSAO reward (SPEC step 6), its sentence-level and KL-only ablations, the KL penalty.

All functions are pure and jittable; every constant is an argument (from config and the
run's `BaselineScores`). Shapes: B = batch, T = sequence positions (response tokens are
where `response_mask` is 1). Scores are verifier scores `100 * cos`; log-probs in nats.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

REWARD_KINDS = ("token", "sentence", "none")


def reward_branch(scores: jax.Array, s_c, s_h, s_min, s_max) -> jax.Array:
    """+1 where the clipped score is >= s_c, -1 where <= s_h (and not >= s_c), else 0 (int32)."""
    s = jnp.clip(scores, s_min, s_max)
    return jnp.where(s >= s_c, 1, jnp.where(s <= s_h, -1, 0)).astype(jnp.int32)


def score_reward(scores: jax.Array, s_c, s_h, s_min, s_max, margin) -> jax.Array:
    """SPEC step 6 for scores of any shape: with s clipped to [s_min, s_max],
    margin * (s - s_min) / (s_max - s_min) if s >= s_c (in [0, margin]);
    margin * (s - s_max) / (s_max - s_min) if s <= s_h (in [-margin, 0]); else 0."""
    s = jnp.clip(scores, s_min, s_max).astype(jnp.float32)
    width = s_max - s_min
    positive = margin * (s - s_min) / width
    negative = margin * (s - s_max) / width
    branch = reward_branch(scores, s_c, s_h, s_min, s_max)
    return jnp.where(branch > 0, positive, jnp.where(branch < 0, negative, 0.0))


def token_level_reward(scores: jax.Array, entity_ids: jax.Array, s_c, s_h, s_min, s_max,
                       margin) -> jax.Array:
    """FiSAO reward [B, T]: `score_reward` at each entity span's last token, 0 elsewhere.

    scores: [B, T] verifier score of the span ending at each position (ignored where
      entity_ids < 0, so it may hold anything there).
    entity_ids: [B, T] int, >= 0 at span ends (from `find_entity_spans`), -1 elsewhere.
    """
    reward = score_reward(scores, s_c, s_h, s_min, s_max, margin)
    return jnp.where(entity_ids >= 0, reward, 0.0)


def last_token_index(response_mask: jax.Array) -> jax.Array:
    """[B] index of the last position where response_mask is nonzero; -1 for an empty row."""
    positions = jnp.arange(response_mask.shape[-1])
    return jnp.max(jnp.where(response_mask != 0, positions, -1), axis=-1)


def sentence_level_reward(sentence_scores: jax.Array, response_mask: jax.Array, s_c, s_h,
                          s_min, s_max, margin) -> jax.Array:
    """Sentence-level ablation [B, T]: one reward per response at its last token.

    sentence_scores: [B] verifier score of each whole response against its image.
    Normalisation: the score goes through the same piecewise map as an entity's
    (`score_reward`, same baseline scores s_c, s_h, s_min, s_max and margin), so this
    ablation changes only where the reward lands, not its scale: one reward in
    [-margin, margin] per response. An empty response gets none.
    """
    reward = score_reward(sentence_scores, s_c, s_h, s_min, s_max, margin)
    last = jax.nn.one_hot(last_token_index(response_mask), response_mask.shape[-1],
                          dtype=jnp.float32)  # one_hot(-1) is all zeros
    return last * reward[:, None]


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, beta) -> jax.Array:
    """Per-token KL penalty [B, T]: -beta * (logp - ref_logp) where mask, 0 elsewhere.

    logp, ref_logp: [B, T] log-probs (nats) of the sampled tokens under policy and reference.
    """
    return jnp.where(mask != 0, -beta * (logp - ref_logp), 0.0).astype(jnp.float32)


class Rewards(NamedTuple):
    """Per-token rewards [B, T]: total = task + kl."""

    total: jax.Array
    task: jax.Array
    kl: jax.Array


@functools.partial(jax.jit, static_argnames=("kind",))
def total_rewards(kind: str, logp: jax.Array, ref_logp: jax.Array, response_mask: jax.Array,
                  beta, *, token_scores: jax.Array | None = None,
                  entity_ids: jax.Array | None = None, sentence_scores: jax.Array | None = None,
                  s_c=None, s_h=None, s_min=None, s_max=None, margin=None) -> Rewards:
    """Rewards of one rollout batch for `kind` (static): 'token' (FiSAO), 'sentence', 'none'.

    'token' needs token_scores and entity_ids [B, T] (spans outside the response are
    ignored); 'sentence' needs sentence_scores [B]; both need the baseline scores s_c, s_h,
    s_min, s_max and the margin. 'none' is the KL penalty alone.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")
    kl = kl_penalty(logp, ref_logp, response_mask, beta)
    if kind == "none":
        return Rewards(total=kl, task=jnp.zeros_like(kl), kl=kl)
    constants = dict(s_c=s_c, s_h=s_h, s_min=s_min, s_max=s_max, margin=margin)
    missing = [k for k, v in constants.items() if v is None]
    if missing:
        raise ValueError(f"reward kind {kind!r} needs {', '.join(missing)}")
    if kind == "token":
        if token_scores is None or entity_ids is None:
            raise ValueError("reward kind 'token' needs token_scores and entity_ids")
        ids = jnp.where(response_mask != 0, entity_ids, -1)
        task = token_level_reward(token_scores, ids, **constants)
    else:
        if sentence_scores is None:
            raise ValueError("reward kind 'sentence' needs sentence_scores")
        task = sentence_level_reward(sentence_scores, response_mask, **constants)
    return Rewards(total=task + kl, task=task, kl=kl)


def span_statistics(scores: jax.Array, entity_ids: jax.Array, rewards: jax.Array, s_c, s_h,
                    s_min, s_max) -> dict[str, jax.Array]:
    """Metrics over entity spans (entity_ids >= 0) of a batch, as float32 scalars.

    spans/count; spans/frac_positive, frac_negative, frac_neutral (which branch of SPEC step
    6 each span's score fell in; 0 when there are no spans); spans/mean_reward and
    spans/mean_score over spans.
    """
    is_span = entity_ids >= 0
    count = jnp.sum(is_span).astype(jnp.float32)
    denom = jnp.maximum(count, 1.0)
    branch = reward_branch(scores, s_c, s_h, s_min, s_max)

    def frac(x):
        return jnp.sum(is_span & x) / denom

    return {
        "spans/count": count,
        "spans/frac_positive": frac(branch > 0),
        "spans/frac_negative": frac(branch < 0),
        "spans/frac_neutral": frac(branch == 0),
        "spans/mean_reward": jnp.sum(jnp.where(is_span, rewards, 0.0)) / denom,
        "spans/mean_score": jnp.sum(jnp.where(is_span, scores, 0.0)) / denom,
    }
