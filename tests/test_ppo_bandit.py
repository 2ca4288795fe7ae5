"""A token bandit: PPO on a tiny LoRA policy learns to emit the one token that pays.

The policy is a bigram model over 8 tokens: a frozen embedding and output layer, a LoRA
adapter (`lora_a`, `lora_b`, B = 0 at init) on the output layer and a `value_head`. Each
response has a few tokens (token 0 is EOS and ends it). The verifier reward is +1 on every
occurrence of TARGET; every token also pays the KL penalty `kl_coef * (logp - ref_logp)` to
the reference policy (the same weights with LoRA off). The rollout -> rewards -> advantages
-> update loop is the trainer's.

With one-token responses the KL-regularised optimum is known in closed form,
pi*(a) ~ ref(a) * exp(r(a) / kl_coef), so the second test checks that PPO lands on it.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from fisao_jax import ppo
from fisao_jax.params import merge_params, split_params
from fisao_jax.policy import entropy_from_logits, logprobs_from_logits
from fisao_jax.train_state import TrainState
from fisao_jax.update import make_optimizer

VOCAB, HIDDEN, RANK = 8, 16, 4
EOS, PROMPT, TARGET = 0, 1, 5


class ToyLoRADense(nn.Module):
    """x @ kernel + x @ lora_a @ lora_b (adapter skipped when use_lora is False)."""

    features: int
    rank: int

    @nn.compact
    def __call__(self, x, use_lora: bool):
        d_in = x.shape[-1]
        y = x @ self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features))
        a = self.param("lora_a", nn.initializers.normal(d_in ** -0.5), (d_in, self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        return y + (x @ a) @ b if use_lora else y


class BigramPolicy(nn.Module):
    """prev_tokens [B, N] -> (logits [B, N, V], values [B, N])."""

    @nn.compact
    def __call__(self, prev_tokens, use_lora: bool = True):
        h = jnp.tanh(nn.Embed(VOCAB, HIDDEN, name="embed")(prev_tokens))
        logits = ToyLoRADense(VOCAB, RANK, name="lm_head")(h, use_lora)
        return logits, nn.Dense(1, name="value_head")(h)[..., 0]


MODEL = BigramPolicy()


def policy_fn(params, mb):
    logits, values = MODEL.apply({"params": params}, mb["prev_tokens"])
    return {"logp": logprobs_from_logits(logits, mb["tokens"]), "values": values,
            "entropy": entropy_from_logits(logits)}


def first_token_dists(params):
    """(policy, reference) next-token probabilities after the prompt, [V] each."""
    prompt = jnp.full((1, 1), PROMPT)
    logits, _ = MODEL.apply({"params": params}, prompt)
    ref_logits, _ = MODEL.apply({"params": params}, prompt, use_lora=False)
    return jax.nn.softmax(logits[0, 0]), jax.nn.softmax(ref_logits[0, 0])


def exact_kl_all_contexts(params):
    """Mean over the 8 possible previous tokens of KL(policy || reference), nats."""
    prev = jnp.arange(VOCAB)[:, None]
    logp = jax.nn.log_softmax(MODEL.apply({"params": params}, prev)[0])
    ref = jax.nn.log_softmax(MODEL.apply({"params": params}, prev, use_lora=False)[0])
    return float(jnp.mean(jnp.sum(jnp.exp(logp) * (logp - ref), axis=-1)))


def make_rollout(n_tokens: int, kl_coef: float, batch_size: int):
    @jax.jit
    def rollout(state, frozen, key):
        params = merge_params(state.trainable, frozen)
        prev, tokens = jnp.full((batch_size, 1), PROMPT), []
        for k in jax.random.split(key, n_tokens):
            logits, _ = MODEL.apply({"params": params}, prev)
            prev = jax.random.categorical(k, logits[:, -1])[:, None]
            tokens.append(prev[:, 0])
        tokens = jnp.stack(tokens, axis=1)
        prev_tokens = jnp.concatenate([jnp.full((batch_size, 1), PROMPT), tokens[:, :-1]], axis=1)
        is_eos = (tokens == EOS).astype(jnp.int32)
        mask = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # real up to and including EOS

        logits, values = MODEL.apply({"params": params}, prev_tokens)
        ref_logits, _ = MODEL.apply({"params": params}, prev_tokens, use_lora=False)
        logp = logprobs_from_logits(logits, tokens)
        ref_logp = logprobs_from_logits(ref_logits, tokens)
        scores = (tokens == TARGET).astype(jnp.float32)
        rewards = jnp.where(mask, scores - kl_coef * (logp - ref_logp), 0.0)
        adv, returns = ppo.compute_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
        batch = {"prev_tokens": prev_tokens, "tokens": tokens, "mask": mask.astype(jnp.float32),
                 "old_logp": logp, "old_values": values, "advantages": adv, "returns": returns}
        return batch, ppo.objective_metrics(logp, logp - ref_logp, scores, mask, kl_coef)

    return rollout


def train(n_tokens: int, kl_coef: float, iterations: int, seed: int = 0, batch_size: int = 64,
          lr: float = 1e-2):
    """Run PPO; returns (initial params, final params, per-iteration metrics)."""
    optimizer = make_optimizer(lr, max_grad_norm=1.0)
    params = MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    trainable, frozen = split_params(params)
    state = TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32))
    update = jax.jit(ppo.make_ppo_update(policy_fn, optimizer, ppo_epochs=4, num_minibatches=2))
    rollout = make_rollout(n_tokens, kl_coef, batch_size)
    key = jax.random.PRNGKey(seed + 1)
    history = []
    for _ in range(iterations):
        key, k_roll, k_upd = jax.random.split(key, 3)
        batch, objective = rollout(state, frozen, k_roll)
        state, metrics = update(state, frozen, batch, k_upd)
        assert bool(metrics["finite"])
        history.append({**{k: float(v) for k, v in objective.items()},
                        **{k: float(v) for k, v in metrics.items()}})
    return params, merge_params(state.trainable, frozen), history


def kl(p, q) -> float:
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return float(np.sum(p * np.log(p / q)))


def test_bandit_reward_raises_target_probability_with_bounded_kl():
    init, final, history = train(n_tokens=3, kl_coef=0.05, iterations=12)
    p0, ref0 = first_token_dists(init)
    p1, ref1 = first_token_dists(final)
    np.testing.assert_array_equal(p0, ref0)  # LoRA B = 0: the fresh policy is the reference
    np.testing.assert_array_equal(ref0, ref1)  # the reference never moves (frozen weights)
    assert float(p0[TARGET]) < 0.2
    assert float(p1[TARGET]) > 0.6
    assert history[-1]["objective/scores"] > 2 * history[0]["objective/scores"]
    # Bounded drift: well below the log(1/ref) ~ 2.1 nats of a policy that only emits TARGET.
    assert 0.05 < exact_kl_all_contexts(final) < 1.5
    assert max(h["policy/approxkl_avg"] for h in history) < 0.1  # each update stays near its rollout policy


def test_one_token_bandit_reaches_kl_regularised_optimum():
    kl_coef = 0.5
    # A larger batch and smaller steps than above, so the end point is not sampling noise.
    _, final, _ = train(n_tokens=1, kl_coef=kl_coef, iterations=30, batch_size=256, lr=5e-3)
    p, ref = (np.asarray(x, np.float64) for x in first_token_dists(final))
    w = ref * np.exp((np.arange(VOCAB) == TARGET) / kl_coef)
    p_star = w / w.sum()
    assert p_star[TARGET] == pytest.approx(0.51, abs=0.01)  # from ref[TARGET] = 0.125
    assert kl(p_star, ref) == pytest.approx(0.44, abs=0.01)
    assert abs(p[TARGET] - p_star[TARGET]) < 0.08
    # Far below the ~2.1 nats of the unregularised optimum (always TARGET).
    assert 0.25 < kl(p, ref) < kl(p_star, ref) + 0.15
    assert kl(p, p_star) < 0.02
