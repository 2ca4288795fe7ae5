"""FiSAO reward, sentence-level ablation and KL penalty against hand-computed numbers.

Baseline used throughout: s_c = 25, s_h = 20, s_min = 15, s_max = 35 (width 20), margin 10.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax.rewards import reward

RP = reward.RewardParams.create(margin=10.0, s_c=25.0, s_h=20.0, s_min=15.0, s_max=35.0)


def test_token_reward_each_branch_and_clipping():
    scores = jnp.array([[30.0, 18.0, 22.0, 40.0, 10.0, 25.0, 20.0]])
    ids = jnp.zeros((1, 7), jnp.int32)
    got = reward.token_level_reward(scores, ids, RP)
    # 10*(30-15)/20; 10*(18-35)/20; between s_h and s_c; 40 -> 35: 10*20/20;
    # 10 -> 15: 10*(15-35)/20; s = s_c: 10*10/20; s = s_h: 10*(20-35)/20.
    np.testing.assert_allclose(got, [[7.5, -8.5, 0.0, 10.0, -10.0, 5.0, -7.5]], rtol=1e-6)


def test_token_reward_only_at_span_ends():
    # "teddy bear" = tokens 1..2 ends at 2 (score 30); "cat" ends at 4 (score 19).
    scores = jnp.array([[31.0, 33.0, 30.0, 28.0, 19.0, jnp.nan]])
    ids = jnp.array([[-1, -1, 7, -1, 3, -1]])
    got = reward.token_level_reward(scores, ids, RP)
    np.testing.assert_allclose(got, [[0.0, 0.0, 7.5, 0.0, -8.0, 0.0]], rtol=1e-6)


def test_no_entity_in_response_gives_zero_task_reward():
    scores = jnp.full((2, 4), 30.0)
    ids = jnp.full((2, 4), -1)
    assert not np.asarray(reward.token_level_reward(scores, ids, RP)).any()


def test_sentence_reward_at_last_response_token():
    mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    got = reward.sentence_level_reward(jnp.array([30.0, 18.0, 30.0]), mask, RP)
    np.testing.assert_allclose(got, [[0, 0, 7.5, 0], [0, 0, 0, -8.5], [0, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(reward.last_token_index(mask), [2, 3, -1])


def test_kl_estimators():
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    ref = jnp.array([[-1.5, -1.0, -9.0]])
    np.testing.assert_allclose(reward.kl_estimate(logp, ref, "k1"), [[0.5, -1.0, 6.0]], rtol=1e-6)
    d = np.array([0.5, -1.0, 6.0])
    np.testing.assert_allclose(reward.kl_estimate(logp, ref, "k3"), [np.exp(-d) + d - 1], rtol=1e-6)
    with pytest.raises(ValueError, match="KL estimator must be one of"):
        reward.kl_estimate(logp, ref, "k2")


def test_total_rewards_penalise_the_response_tokens_only():
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    ref = jnp.array([[-1.5, -1.0, -9.0]])
    task = jnp.array([[1.0, 0.0, 0.0]])
    got = reward.total_rewards(task, logp, ref, jnp.array([[1, 1, 0]]), beta=0.1)
    np.testing.assert_allclose(got.kl, [[-0.05, 0.1, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(got.kl_tokens, [[0.5, -1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(got.total, [[0.95, 0.1, 0.0]], rtol=1e-6)


def test_task_rewards_kinds():
    mask = jnp.array([[1, 1, 1, 0]])
    # The span ending at position 3 is outside the response and gets nothing.
    objects = reward.token_level_reward(jnp.array([[30.0, 0, 18.0, 30.0]]), jnp.array([[2, -1, 5, 1]]), RP)
    token = reward.task_rewards("token", mask, RP, object_rewards=objects)
    np.testing.assert_allclose(token, [[7.5, 0, -8.5, 0]], rtol=1e-6)
    sentence = reward.task_rewards("sentence", mask, RP, sentence_scores=jnp.array([30.0]))
    np.testing.assert_allclose(sentence, [[0, 0, 7.5, 0]], rtol=1e-6)
    assert not np.asarray(reward.task_rewards("none", mask)).any()


def test_task_rewards_bad_arguments():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="reward kind must be one of"):
        reward.task_rewards("word", x, RP)
    with pytest.raises(ValueError, match="needs object_rewards"):
        reward.task_rewards("token", x, RP)
    with pytest.raises(ValueError, match="needs sentence_scores"):
        reward.task_rewards("sentence", x, RP)


def test_reward_params_are_traced_not_baked_in():
    traces = []

    def f(scores, ids, rp):
        traces.append(1)
        return reward.token_level_reward(scores, ids, rp)

    f = jax.jit(f)
    ids = jnp.zeros((1, 1), jnp.int32)
    a = f(jnp.array([[30.0]]), ids, RP)
    b = f(jnp.array([[30.0]]), ids, RP.replace(margin=jnp.float32(20.0)))
    np.testing.assert_allclose([a[0, 0], b[0, 0]], [7.5, 15.0], rtol=1e-6)
    assert len(traces) == 1, "a new margin must not recompile"


def test_span_statistics():
    scores = jnp.array([[30.0, 18.0, 22.0, 40.0, 99.0]])
    ids = jnp.array([[0, 1, 2, 3, -1]])
    rewards = reward.token_level_reward(scores, ids, RP)
    stats = reward.span_statistics(scores, ids, rewards, RP)
    want = {"spans/count": 4, "spans/frac_positive": 0.5, "spans/frac_negative": 0.25,
            "spans/frac_neutral": 0.25, "spans/mean_reward": (7.5 - 8.5 + 0 + 10) / 4,
            "spans/mean_score": (30 + 18 + 22 + 40) / 4}
    assert {k: pytest.approx(float(v)) for k, v in stats.items()} == want
    empty = reward.span_statistics(scores, jnp.full((1, 5), -1), rewards, RP)
    assert all(float(v) == 0.0 for v in empty.values())
