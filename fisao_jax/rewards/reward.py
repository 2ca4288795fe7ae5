"""The FiSAO reward (SPEC step 6), its sentence-level and KL-only ablations, the KL penalty.

All functions are pure and jittable. The reward's constants travel as one pytree,
`RewardParams` (margin lambda and the baseline scores s_c, s_h, s_min, s_max), so a change of
margin or baseline reaches a compiled step as data, not as a recompilation. Shapes: B =
batch, T = response positions (real where `response_mask` is 1). Scores are verifier scores
`100 * cos`; log-probs in nats.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

REWARD_KINDS = ("token", "sentence", "none")
KL_ESTIMATORS = ("k1", "k3")


class RewardParams(struct.PyTreeNode):
    """margin (lambda) and the baseline scores of SPEC steps 5-6, float32 scalars."""

    margin: jax.Array
    s_c: jax.Array
    s_h: jax.Array
    s_min: jax.Array
    s_max: jax.Array

    @classmethod
    def create(cls, margin: float, s_c: float, s_h: float, s_min: float, s_max: float) -> "RewardParams":
        f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return cls(f(margin), f(s_c), f(s_h), f(s_min), f(s_max))


def reward_branch(scores: jax.Array, rp: RewardParams) -> jax.Array:
    """+1 where the clipped score is >= s_c, -1 where <= s_h (and not >= s_c), else 0 (int32)."""
    s = jnp.clip(scores, rp.s_min, rp.s_max)
    return jnp.where(s >= rp.s_c, 1, jnp.where(s <= rp.s_h, -1, 0)).astype(jnp.int32)


def score_reward(scores: jax.Array, rp: RewardParams) -> jax.Array:
    """SPEC step 6 for scores of any shape: with s clipped to [s_min, s_max],
    margin * (s - s_min) / (s_max - s_min) if s >= s_c (in [0, margin]);
    margin * (s - s_max) / (s_max - s_min) if s <= s_h (in [-margin, 0]); else 0."""
    s = jnp.clip(scores, rp.s_min, rp.s_max).astype(jnp.float32)
    width = rp.s_max - rp.s_min
    positive = rp.margin * (s - rp.s_min) / width
    negative = rp.margin * (s - rp.s_max) / width
    branch = reward_branch(scores, rp)
    return jnp.where(branch > 0, positive, jnp.where(branch < 0, negative, 0.0))


def token_level_reward(scores: jax.Array, entity_ids: jax.Array, rp: RewardParams) -> jax.Array:
    """FiSAO reward [B, T]: `score_reward` at each entity span's last token, 0 elsewhere.

    scores: [B, T] verifier score of the span ending at each position (ignored where
      entity_ids < 0, so it may hold anything there).
    entity_ids: [B, T] int, >= 0 at span ends (from `find_entity_spans`), -1 elsewhere."""
    return jnp.where(entity_ids >= 0, score_reward(scores, rp), 0.0)


def last_token_index(response_mask: jax.Array) -> jax.Array:
    """[B] index of the last position where response_mask is nonzero; -1 for an empty row."""
    positions = jnp.arange(response_mask.shape[-1])
    return jnp.max(jnp.where(response_mask != 0, positions, -1), axis=-1)


def sentence_level_reward(sentence_scores: jax.Array, response_mask: jax.Array, rp: RewardParams) -> jax.Array:
    """Sentence-level ablation [B, T]: one reward per response at its last token.

    sentence_scores: [B] verifier score of each whole response against its image. The score
    goes through the same piecewise map as an entity's (`score_reward`), so this ablation
    changes only where the reward lands, not its scale. An empty response gets none."""
    last = jax.nn.one_hot(last_token_index(response_mask), response_mask.shape[-1],
                          dtype=jnp.float32)  # one_hot(-1) is all zeros
    return last * score_reward(sentence_scores, rp)[:, None]


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs [B, T].

    'k1': logp - ref_logp (unbiased, the reward penalty of FiSAO and TRL's PPO);
    'k3': exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative; GRPO's loss term)."""
    diff = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if estimator == "k1":
        return diff
    if estimator == "k3":
        return jnp.exp(-diff) + diff - 1.0
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


class Rewards(NamedTuple):
    """Per-token rewards [B, T]: total = task + kl, with kl = -beta * kl_tokens."""

    total: jax.Array
    task: jax.Array
    kl: jax.Array
    kl_tokens: jax.Array  # the per-token KL estimate (0 outside the response)


def task_rewards(kind: str, response_mask: jax.Array, rp: RewardParams | None = None, *,
                 object_rewards: jax.Array | None = None, sentence_scores: jax.Array | None = None) -> jax.Array:
    """The verifier's rewards [B, T] for `kind` (static): 'token' (FiSAO) = `object_rewards`
    (from `token_level_reward`, computed once per batch) inside the response; 'sentence' = one
    reward per response from `sentence_scores` [B]; 'none' = zeros (the KL-only ablation)."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")
    real = response_mask != 0
    if kind == "none":
        return jnp.zeros(response_mask.shape, jnp.float32)
    if kind == "token":
        if object_rewards is None:
            raise ValueError("reward kind 'token' needs object_rewards")
        return jnp.where(real, object_rewards, 0.0)
    if sentence_scores is None or rp is None:
        raise ValueError("reward kind 'sentence' needs sentence_scores and the reward params")
    return sentence_level_reward(sentence_scores, response_mask, rp)


def total_rewards(task: jax.Array, logp: jax.Array, ref_logp: jax.Array, response_mask: jax.Array, beta,
                  estimator: str = "k1") -> Rewards:
    """Per-token rewards: the task rewards [B, T] plus, on every response token, the penalty
    -beta * kl_estimate(logp, ref_logp)."""
    kl_tokens = jnp.where(response_mask != 0, kl_estimate(logp, ref_logp, estimator), 0.0)
    kl = -beta * kl_tokens
    return Rewards(total=task + kl, task=task, kl=kl, kl_tokens=kl_tokens)


def span_statistics(scores: jax.Array, entity_ids: jax.Array, rewards: jax.Array, rp: RewardParams) -> dict:
    """Metrics over entity spans (entity_ids >= 0) of a batch, as float32 scalars.

    rewards [B, T]: each span's reward at its end (the token-level reward, computed once by the
    caller). spans/count; spans/frac_positive, frac_negative, frac_neutral (which branch of
    SPEC step 6 each span's score fell in; 0 when there are no spans); spans/mean_reward and
    spans/mean_score over spans."""
    is_span = entity_ids >= 0
    count = jnp.sum(is_span).astype(jnp.float32)
    denom = jnp.maximum(count, 1.0)
    branch = reward_branch(scores, rp)

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
