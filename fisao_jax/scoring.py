"""Scoring a rollout batch: everything between the rollout and the PPO update, in one jit.

    score(params, verifier_state, reward_params, batch, tokens, mask, shuffle_key, sentence_scores) -> dict

1. One teacher-forced pass of the policy (LoRA on) gives the log-probs and values PPO starts
   from (`old_logp`, `old_values`), and one with LoRA off the reference log-probs. They run
   the update's own `policy_fn` on the update's first-epoch minibatches (`shuffle_key`: the
   update's epoch-0 key), so that the update's first minibatch evaluates exactly the same
   computation on exactly the same rows: its ratio is 1 in any dtype (the rollout's KV-cache
   log-probs, and a pass over a different number of rows, differ by bf16 rounding).
2. The verifier finds the entity spans and scores them against the image.
3. Rewards: the token-level reward (computed once: it is also the span statistics' reward),
   the sentence-level or no task reward for the ablations, and the KL penalty from one KL
   estimate that `objective/kl` reports too.
4. GAE (or, for `advantage='group'`, group-relative advantages) and the rollout metrics.

The sentence-level ablation alone needs a host step (decode responses, encode them with the
verifier's text tower); its scores come in as `sentence_scores` [B].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from fisao_jax import ppo
from fisao_jax.models.vlm import VisionLanguageModel
from fisao_jax.policy import response_logprobs
from fisao_jax.rewards import reward as reward_lib
from fisao_jax.rewards.verifier import Verifier, VerifierState
from fisao_jax.update import minibatches, unminibatch


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """Static settings of the scoring step (every one a config field)."""

    kind: str = "token"       # reward.kind: 'token' | 'sentence' | 'none'
    kl_coef: float = 0.05     # reward.kl_coef: beta of the per-token KL penalty
    gamma: float = 1.0        # ppo.gamma
    lam: float = 0.95         # ppo.lam
    whiten_advantages: bool = True
    temperature: float = 1.0  # rollout.temperature: log-probs under logits / temperature
    num_minibatches: int = 1  # ppo.num_minibatches: the teacher-forced passes run in the update's minibatches


def teacher_forced_passes(model: VisionLanguageModel, policy_fn, settings: ScoreSettings, params: Any, batch: dict,
                          tokens: jax.Array, mask: jax.Array, shuffle_key: Optional[jax.Array]) -> dict:
    """{'logp', 'values', 'ref_logp'} [B, N]: `policy_fn` (LoRA on) and the reference (LoRA off)
    over the minibatches the update's first epoch draws with `shuffle_key`, in row order."""
    rows = dict(batch, tokens=tokens, mask=mask)

    def one(mb):
        # tie the weights to the loop: otherwise their (FSDP) all-gathers are hoisted out of it
        # as loop-invariant, and the whole gathered model stays in memory
        p, mb = jax.lax.optimization_barrier((params, mb))
        pol = policy_fn(p, mb)
        ref = response_logprobs(model, p, mb, mb["tokens"], mb["mask"], temperature=settings.temperature,
                                use_lora=False)
        return {"logp": pol["logp"], "values": pol["values"], "ref_logp": ref["logprobs"]}

    stacked = jax.lax.map(one, minibatches(rows, settings.num_minibatches, shuffle_key))
    return unminibatch(stacked, shuffle_key)


def make_score_fn(model: VisionLanguageModel, verifier: Verifier, settings: ScoreSettings, policy_fn=None):
    """The pure scoring function (see the module docstring); the caller jits it with its shardings.

    batch: {'input_ids', 'attention_mask' [B, T], image inputs}; tokens, mask [B, N];
    shuffle_key: the update's epoch-0 shuffle key (`fisao_jax.update.epoch_keys(key, epochs)[0]`).
    `policy_fn` must be the update's (default `make_policy_fn(model, settings.temperature)`).
    Returns [B, N] arrays 'old_logp', 'old_values', 'ref_logp', 'entity_ids', 'span_start',
    'token_scores', 'rewards', 'task_rewards', 'advantages', 'returns', [B, Q, D] 'image_emb',
    and scalar 'metrics'."""
    policy_fn = policy_fn or make_policy_fn(model, settings.temperature)

    def score(params: Any, vstate: VerifierState, rp: reward_lib.RewardParams, batch: dict, tokens: jax.Array,
              mask: jax.Array, shuffle_key: Optional[jax.Array] = None,
              sentence_scores: Optional[jax.Array] = None) -> dict:
        tf = teacher_forced_passes(model, policy_fn, settings, params, batch, tokens, mask, shuffle_key)
        found = verifier.verify(vstate, tokens, mask, batch["pixel_values"])
        object_rewards = reward_lib.token_level_reward(found.scores, found.entity_id, rp)
        task = reward_lib.task_rewards(settings.kind, mask, rp, object_rewards=object_rewards,
                                       sentence_scores=sentence_scores)
        rewards = reward_lib.total_rewards(task, tf["logp"], tf["ref_logp"], mask, settings.kl_coef)
        adv, returns = ppo.compute_advantages(rewards.total, tf["values"], mask, settings.gamma, settings.lam,
                                              whiten=settings.whiten_advantages)
        metrics = ppo.objective_metrics(tf["logp"], rewards.kl_tokens, rewards.task, mask, settings.kl_coef)
        metrics.update(reward_lib.span_statistics(found.scores, found.entity_id, object_rewards, rp))
        return {"old_logp": tf["logp"], "old_values": tf["values"], "ref_logp": tf["ref_logp"],
                "entity_ids": found.entity_id, "span_start": found.start, "token_scores": found.scores,
                "rewards": rewards.total, "task_rewards": rewards.task, "advantages": adv, "returns": returns,
                "image_emb": found.image_emb, "metrics": metrics}

    return score


def make_policy_fn(model: VisionLanguageModel, temperature: float = 1.0, entropy: bool = True):
    """PPO's policy_fn(params, minibatch) -> {logp, values, entropy} [b, N] (teacher forced,
    LoRA on). Dropout stays off: PPO's ratio must compare the same function before and after."""

    def policy_fn(params: Any, mb: dict) -> dict:
        out = response_logprobs(model, params, mb, mb["tokens"], mb["mask"], temperature=temperature,
                                use_lora=True, entropy=entropy)
        return {"logp": out["logprobs"], "values": out["values"], **({"entropy": out["entropy"]} if entropy else {})}

    return policy_fn
