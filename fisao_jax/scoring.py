"""Scoring a rollout batch: reference log-probs, entity spans, verifier scores, rewards, GAE.

`make_score_fn` returns one jitted function; everything between the rollout and the PPO
update happens inside it (the sentence-level ablation alone needs a host step to decode
responses, done by the caller and passed in as `sentence_scores`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from fisao_jax import ppo
from fisao_jax.models.clip import CLIPModel
from fisao_jax.models.llava import LlavaModel
from fisao_jax.rewards import reward as reward_lib
from fisao_jax.rewards import verifier
from fisao_jax.rewards.spans import SpanTable, find_entity_span_bounds
from fisao_jax.rollout import Rollout, response_logprobs


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """Constants of SPEC step 6 and of GAE (every one a config field)."""

    kind: str = "token"       # 'token' | 'sentence' | 'none'
    margin: float = 10.0      # lambda, the reward margin
    kl_coef: float = 0.05     # beta, per-token KL penalty
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    temperature: float = 1.0  # log-probs are taken under logits / temperature, as in the rollout


def make_score_fn(model: LlavaModel, clip_model: CLIPModel, settings: RewardSettings, max_span_len: Optional[int] = None):
    """jitted score(params, clip_params, text_table [E,D], span_table, baseline dict, batch, roll,
    sentence_scores [B] or None) -> dict of [B,N] arrays and scalar metrics.

    baseline: {'s_c','s_h','s_min','s_max'} (floats or 0-d arrays; unused for kind 'none').
    batch: {'input_ids' [B,T], 'attention_mask' [B,T], 'pixel_values' [B,3,H,W]}.
    """

    def score(params, clip_params, text_table, span_table: SpanTable, baseline, batch, roll: Rollout,
              sentence_scores=None):
        ref = response_logprobs(model, params, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                roll.tokens, roll.mask, temperature=settings.temperature, use_lora=False)
        spans = find_entity_span_bounds(roll.tokens, roll.mask, span_table, max_span_len=max_span_len)
        img = verifier.image_embeddings(clip_model, clip_params, batch["pixel_values"])
        token_scores = verifier.span_scores(img, text_table, spans.entity_id)
        kw = {} if settings.kind == "none" else dict(baseline, margin=settings.margin)
        rewards = reward_lib.total_rewards(
            settings.kind, roll.logprobs, ref["logprobs"], roll.mask, settings.kl_coef,
            token_scores=token_scores, entity_ids=spans.entity_id, sentence_scores=sentence_scores, **kw)
        adv, returns = ppo.compute_advantages(rewards.total, roll.values, roll.mask, settings.gamma, settings.lam,
                                              whiten=settings.whiten_advantages)
        metrics = ppo.objective_metrics(roll.logprobs, ref["logprobs"], rewards.task, roll.mask, settings.kl_coef)
        if baseline:  # span statistics need the reward boundaries
            object_reward = reward_lib.token_level_reward(token_scores, spans.entity_id, margin=settings.margin,
                                                          **baseline)
            metrics.update(reward_lib.span_statistics(token_scores, spans.entity_id, object_reward, **baseline))
        return {"ref_logprobs": ref["logprobs"], "entity_ids": spans.entity_id, "span_start": spans.start,
                "token_scores": token_scores, "rewards": rewards.total, "task_rewards": rewards.task,
                "advantages": adv, "returns": returns, "image_emb": img, "metrics": metrics}

    return jax.jit(score)


def make_policy_fn(model: LlavaModel, temperature: float = 1.0):
    """PPO's policy_fn(params, minibatch) -> {logp, values, entropy} [b, N] (teacher forced, LoRA on).

    Dropout stays off: PPO's ratio must compare the same function before and after."""

    def policy_fn(params: Any, mb: dict) -> dict:
        out = response_logprobs(model, params, mb["input_ids"], mb["attention_mask"], mb["pixel_values"],
                                mb["tokens"], mb["mask"], temperature=temperature, use_lora=True)
        return {"logp": out["logprobs"], "values": out["values"], "entropy": ppo.entropy_from_logits(out["logits"])}

    return policy_fn
