"""PPO pieces against hand-written NumPy loops (float64), plus the update's guarantees.

The loop references follow the textbook formulas (and TRL's `masked_whiten`, unbiased
variance) token by token over the real tokens only; padded positions hold NaN/inf garbage
to prove they never leak.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from fisao_jax import ppo
from fisao_jax.params import merge_params, split_params, trainable_mask
from fisao_jax.policy import entropy_from_logits, logprobs_from_logits
from fisao_jax.train_state import TrainState
from fisao_jax.update import make_optimizer

B, N = 6, 9
LENGTHS = [9, 5, 1, 7, 0, 3]  # one full row, one single-token row, one empty row


def _mask(lengths=LENGTHS, n=N):
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)


def _with_garbage(x, mask, rng):
    """x with NaN, +-inf and huge values on the padded positions."""
    junk = rng.choice([np.nan, np.inf, -np.inf, 1e30], size=x.shape)
    return np.where(mask > 0, x, junk)


# ------------------------------------------------------------------- loop references


def gae_reference(rewards, values, lengths, gamma, lam):
    adv = np.zeros_like(rewards)
    ret = np.zeros_like(rewards)
    for b, length in enumerate(lengths):
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t]
    return adv, ret


def real_entries(x, lengths):
    return [x[b, t] for b, length in enumerate(lengths) for t in range(length)]


def whiten_reference(x, lengths, shift_mean=True):
    vals = real_entries(x, lengths)
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    out = np.zeros_like(x)
    for b, length in enumerate(lengths):
        for t in range(length):
            out[b, t] = (x[b, t] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out, mean, var


def policy_loss_reference(logp, old_logp, adv, lengths, eps):
    total = clipped_count = sq = neg = ratio_sum = 0.0
    n = 0
    for b, length in enumerate(lengths):
        for t in range(length):
            ratio = math.exp(logp[b, t] - old_logp[b, t])
            unclipped = -adv[b, t] * ratio
            clipped = -adv[b, t] * min(max(ratio, 1 - eps), 1 + eps)
            total += max(unclipped, clipped)
            clipped_count += clipped > unclipped
            sq += (logp[b, t] - old_logp[b, t]) ** 2
            neg += old_logp[b, t] - logp[b, t]
            ratio_sum += ratio
            n += 1
    return total / n, {"clipfrac": clipped_count / n, "approxkl": 0.5 * sq / n,
                       "policykl": neg / n, "ratio": ratio_sum / n}


def value_loss_reference(vpred, old, returns, lengths, eps):
    total = clipped_count = err_sum = v_sum = 0.0
    n = 0
    for b, length in enumerate(lengths):
        for t in range(length):
            v_clip = min(max(vpred[b, t], old[b, t] - eps), old[b, t] + eps)
            e1 = (vpred[b, t] - returns[b, t]) ** 2
            e2 = (v_clip - returns[b, t]) ** 2
            total += max(e1, e2)
            clipped_count += e2 > e1
            err_sum += e1
            v_sum += vpred[b, t]
            n += 1
    return 0.5 * total / n, {"clipfrac": clipped_count / n, "error": err_sum / n, "vpred": v_sum / n}


# ------------------------------------------------------------------------------ tests


def test_gae_hand_example():
    # gamma = lam = 1: every advantage is the reward-to-go minus the value.
    adv, ret = ppo.compute_gae(jnp.array([[0.0, 0.0, 1.0, 7.0]]), jnp.array([[0.5, 0.25, 0.5, 9.0]]),
                               jnp.array([[1, 1, 1, 0]]), 1.0, 1.0)
    np.testing.assert_allclose(adv, [[0.5, 0.75, 0.5, 0.0]], atol=1e-7)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], atol=1e-7)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae_matches_loop_reference(gamma, lam):
    rng = np.random.default_rng(0)
    mask = _mask()
    rewards, values = rng.normal(size=(B, N)), rng.normal(size=(B, N))
    want_adv, want_ret = gae_reference(rewards, values, LENGTHS, gamma, lam)
    with jax.enable_x64(True):
        adv, ret = ppo.compute_gae(_with_garbage(rewards, mask, rng), _with_garbage(values, mask, rng),
                                   mask, gamma, lam)
        assert adv.dtype == jnp.float64
    np.testing.assert_allclose(adv, want_adv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=0, atol=1e-6)


def test_gae_float32_close_to_reference():
    rng = np.random.default_rng(1)
    mask = _mask()
    rewards, values = rng.normal(size=(B, N)), rng.normal(size=(B, N))
    want_adv, _ = gae_reference(rewards, values, LENGTHS, 1.0, 0.95)
    adv, _ = jax.jit(ppo.compute_gae, static_argnums=(3, 4))(
        jnp.float32(rewards), jnp.float32(values), jnp.float32(mask), 1.0, 0.95)
    assert adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, want_adv, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shift_mean):
    rng = np.random.default_rng(2)
    mask = _mask()
    x = 3.0 + 2.0 * rng.normal(size=(B, N))
    want, mean, var = whiten_reference(x, LENGTHS, shift_mean)
    real = mask > 0
    with jax.enable_x64(True):
        garbage_free = np.where(real, x, 0.0)
        got = ppo.masked_whiten(_with_garbage(x, mask, rng), mask, shift_mean=shift_mean)
        np.testing.assert_allclose(ppo.masked_mean(_with_garbage(x, mask, rng), mask), mean, atol=1e-12)
        np.testing.assert_allclose(ppo.masked_var(garbage_free, mask), var, atol=1e-12)
        np.testing.assert_allclose(ppo.masked_var(garbage_free, mask, unbiased=False),
                                   np.var(x[real]), atol=1e-12)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=0, atol=1e-6)
    assert np.var(x[real], ddof=1) == pytest.approx(var, rel=1e-12)  # TRL's unbiased variance


def test_masked_stats_degenerate_masks_are_finite():
    x = jnp.array([[1.0, 2.0, 3.0]])
    assert float(ppo.masked_mean(x, jnp.zeros((1, 3)))) == 0.0
    assert float(ppo.masked_var(x, jnp.array([[0, 1, 0]]))) == 0.0
    np.testing.assert_allclose(ppo.masked_whiten(x, jnp.array([[0, 1, 0]])), [[-1e4, 0.0, 1e4]], rtol=1e-5)


def test_compute_advantages_whitened_over_real_tokens():
    rng = np.random.default_rng(3)
    mask = _mask()
    rewards, values = rng.normal(size=(B, N)), rng.normal(size=(B, N))
    want_adv, want_ret = gae_reference(rewards, values, LENGTHS, 1.0, 0.95)
    want_white, _, _ = whiten_reference(want_adv, LENGTHS)
    with jax.enable_x64(True):
        adv, ret = ppo.compute_advantages(_with_garbage(rewards, mask, rng), values, mask, 1.0, 0.95)
        raw, _ = ppo.compute_advantages(rewards, values, mask, 1.0, 0.95, whiten=False)
    np.testing.assert_allclose(adv, want_white, rtol=0, atol=1e-6)  # zeros on padding included
    np.testing.assert_allclose(ret, want_ret, rtol=0, atol=1e-6)
    np.testing.assert_allclose(raw, want_adv, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_reference(seed):
    rng = np.random.default_rng(seed)
    mask = _mask()
    old = -rng.exponential(size=(B, N))
    logp = old + 0.3 * rng.normal(size=(B, N))
    adv = rng.normal(size=(B, N))
    want_loss, want = policy_loss_reference(logp, old, adv, LENGTHS, 0.2)
    assert 0.1 < want["clipfrac"] < 0.9  # both branches exercised
    with jax.enable_x64(True):
        loss, stats = ppo.policy_loss(_with_garbage(logp, mask, rng), _with_garbage(old, mask, rng),
                                      _with_garbage(adv, mask, rng), mask, 0.2)
        grad = jax.grad(lambda lp: ppo.policy_loss(lp, old, adv, mask, 0.2)[0])(
            jnp.asarray(_with_garbage(logp, mask, rng)))
    assert abs(float(loss) - want_loss) <= 1e-6
    for k, v in want.items():
        assert abs(float(stats[k]) - v) <= 1e-6, k
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_value_loss_matches_reference(seed):
    rng = np.random.default_rng(seed + 10)
    mask = _mask()
    old = rng.normal(size=(B, N))
    vpred = old + 0.3 * rng.normal(size=(B, N))
    returns = old + rng.normal(size=(B, N))
    want_loss, want = value_loss_reference(vpred, old, returns, LENGTHS, 0.2)
    assert 0.1 < want["clipfrac"] < 0.9
    with jax.enable_x64(True):
        loss, stats = ppo.value_loss(_with_garbage(vpred, mask, rng), _with_garbage(old, mask, rng),
                                     _with_garbage(returns, mask, rng), mask, 0.2)
    assert abs(float(loss) - want_loss) <= 1e-6
    for k, v in want.items():
        assert abs(float(stats[k]) - v) <= 1e-6, k


def test_logprobs_and_entropy_match_torch():
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(3, 5, 11)) * 4.0).astype(np.float32)
    logits[0] += 1e4  # a large offset must not overflow
    tokens = rng.integers(0, 11, size=(3, 5))
    t_logits = torch.from_numpy(logits).double()
    want_lp = torch.log_softmax(t_logits, -1).gather(-1, torch.from_numpy(tokens)[..., None])[..., 0]
    want_ent = torch.distributions.Categorical(logits=t_logits).entropy()
    lp = logprobs_from_logits(logits, tokens)
    ent = entropy_from_logits(logits)
    assert lp.dtype == ent.dtype == jnp.float32
    np.testing.assert_allclose(lp, want_lp.numpy(), atol=2e-5)
    np.testing.assert_allclose(ent, want_ent.numpy(), atol=2e-5)
    assert logprobs_from_logits(jnp.asarray(logits, jnp.bfloat16), tokens).dtype == jnp.float32


def test_entropy_with_masked_vocabulary():
    logits = jnp.array([[0.0, math.log(3.0), -jnp.inf, -jnp.inf]])
    # p = (1/4, 3/4): H = -(0.25 ln 0.25 + 0.75 ln 0.75)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(entropy_from_logits(logits)[0]) == pytest.approx(want, abs=1e-6)
    grad = jax.grad(lambda x: entropy_from_logits(x).sum())(logits)
    assert np.all(np.isfinite(grad))


def test_objective_metrics():
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    logp = jnp.array([[-1.0, -2.0, -0.5], [-1.0, jnp.nan, 0.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    score = jnp.array([[0.0, 4.0, 0.0], [-2.0, 9.0, 9.0]])
    m = ppo.objective_metrics(logp, logp - ref, score, mask, kl_coef=0.1)
    # per-response kl sums -0.5 and 1; -logp sums 3.5 and 1; scores 4 and -2
    expected = {"objective/kl": 0.25, "objective/entropy": 2.25, "objective/non_score_reward": -0.025,
                "objective/scores": 1.0, "objective/rlhf_reward": 0.975, "tokens/responses_len_mean": 2.0}
    for k, v in expected.items():
        assert float(m[k]) == pytest.approx(v, abs=1e-6), k


# ------------------------------------------------------------------ params split/merge

VOCAB, HIDDEN, RANK = 7, 5, 2


def _toy_params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (VOCAB, HIDDEN))},
        "decoder": {"layers_0": {"proj": {
            "kernel": jax.random.normal(k[1], (HIDDEN, VOCAB)) / 3,
            "bias": jnp.zeros((VOCAB,)),
            "lora_a": jax.random.normal(k[2], (HIDDEN, RANK)) / 3,
            "lora_b": jnp.zeros((RANK, VOCAB))}}},
        "value_head": {"kernel": jax.random.normal(k[3], (HIDDEN, 1)) / 3, "bias": jnp.zeros((1,))},
    }


def test_trainable_mask_split_merge():
    params = _toy_params()
    mask = trainable_mask(params)
    assert mask["decoder"]["layers_0"]["proj"] == {"kernel": False, "bias": False, "lora_a": True, "lora_b": True}
    assert mask["value_head"] == {"kernel": True, "bias": True} and mask["embed"] == {"embedding": False}
    trainable, frozen = split_params(params)
    assert trainable == {"decoder": {"layers_0": {"proj": {"lora_a": params["decoder"]["layers_0"]["proj"]["lora_a"],
                                                          "lora_b": params["decoder"]["layers_0"]["proj"]["lora_b"]}}},
                         "value_head": params["value_head"]}
    assert set(frozen) == {"embed", "decoder"} and set(frozen["decoder"]["layers_0"]["proj"]) == {"kernel", "bias"}
    merged = merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))


def test_split_merge_errors():
    with pytest.raises(ValueError, match="no trainable leaf.*embed"):
        split_params({"embed": {"embedding": jnp.zeros(3)}})
    with pytest.raises(ValueError, match="decoder/lora_a"):
        merge_params({"decoder": {"lora_a": jnp.zeros(2)}}, {"decoder": {"lora_a": jnp.ones(2)}})


# ------------------------------------------------------------------------- the update


def toy_policy_fn(params, mb):
    h = jnp.tanh(params["embed"]["embedding"][mb["prev_tokens"]])  # [b, N, H]
    proj = params["decoder"]["layers_0"]["proj"]
    logits = h @ proj["kernel"] + proj["bias"] + (h @ proj["lora_a"]) @ proj["lora_b"]
    values = (h @ params["value_head"]["kernel"] + params["value_head"]["bias"])[..., 0]
    return {"logp": logprobs_from_logits(logits, mb["tokens"]), "values": values,
            "entropy": entropy_from_logits(logits)}


def _toy_batch(seed=0, b=8, n=4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, size=b)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    tokens = rng.integers(0, VOCAB, size=(b, n))
    prev = np.concatenate([np.zeros((b, 1), int), tokens[:, :-1]], axis=1)
    out = toy_policy_fn(_toy_params(), {"prev_tokens": prev, "tokens": tokens})
    adv, ret = ppo.compute_advantages(rng.normal(size=(b, n)), out["values"], mask, 1.0, 0.95)
    return {"prev_tokens": jnp.asarray(prev), "tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
            "old_logp": out["logp"], "old_values": out["values"], "advantages": adv, "returns": ret}


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _init(params, optimizer):
    """(TrainState, frozen) of a params tree."""
    trainable, frozen = split_params(params)
    return TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32)), frozen


def test_update_trains_only_lora_and_value_head():
    optimizer = make_optimizer(1e-2, weight_decay=0.01)
    state, frozen = _init(_toy_params(), optimizer)
    frozen_before = _bits(frozen)
    trainable_before = _bits(state.trainable)
    update = ppo.make_ppo_update(toy_policy_fn, optimizer, ppo_epochs=2, num_minibatches=2)
    new_state, metrics = update(state, frozen, _toy_batch(), jax.random.PRNGKey(0))
    assert bool(metrics["finite"]) and int(new_state.step) == 4  # 2 epochs x 2 minibatches
    assert _bits(frozen) == frozen_before
    changed = [a != b for a, b in zip(_bits(new_state.trainable), trainable_before)]
    assert all(changed)  # lora_a, lora_b, value_head kernel and bias all moved
    # The optimizer state mirrors the trainable tree only: Adam's mu and nu, nothing frozen.
    n_trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(new_state.opt_state)
                if jnp.issubdtype(x.dtype, jnp.floating))
    assert n_opt == 2 * n_trainable
    for k in ["policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
              "loss/value_avg", "val/clipfrac_avg", "val/vpred", "val/error", "val/mean", "val/var",
              "val/ratio", "val/ratio_var", "val/var_explained", "ppo/returns/mean", "ppo/returns/var",
              "optim/grad_norm", "optim/grad_norm_lora", "optim/grad_norm_value_head"]:
        assert np.isfinite(float(metrics[k])), k


def test_update_matches_manual_adam_steps():
    """ppo_epochs=3 with one minibatch (order-free) equals three hand-driven optax steps."""
    clip, clip_v, vf_coef, ent_coef = 0.2, 0.2, 0.5, 0.01
    optimizer = make_optimizer(3e-2, max_grad_norm=0.5)
    batch = _toy_batch(seed=5)
    state, frozen = _init(_toy_params(), optimizer)
    update = ppo.make_ppo_update(toy_policy_fn, optimizer, ppo_epochs=3, num_minibatches=1,
                                 clip_eps=clip, clip_eps_value=clip_v, vf_coef=vf_coef, ent_coef=ent_coef)
    got, metrics = update(state, frozen, batch, jax.random.PRNGKey(1))

    m = batch["mask"]
    n = m.sum()

    def loss(trainable):  # written out directly, without the module's loss helpers
        out = toy_policy_fn(merge_params(trainable, frozen), batch)
        ratio = jnp.exp(out["logp"] - batch["old_logp"])
        a = batch["advantages"]
        pg = (jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1 - clip, 1 + clip)) * m).sum() / n
        v_c = batch["old_values"] + jnp.clip(out["values"] - batch["old_values"], -clip_v, clip_v)
        vf = 0.5 * (jnp.maximum((out["values"] - batch["returns"]) ** 2, (v_c - batch["returns"]) ** 2) * m).sum() / n
        ent = (out["entropy"] * m).sum() / n
        return pg + vf_coef * vf - ent_coef * ent, pg

    trainable, opt_state, pg_losses = state.trainable, state.opt_state, []
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for _ in range(3):
        (_, pg), grads = grad_fn(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        pg_losses.append(float(pg))
    for a, b in zip(jax.tree.leaves(got.trainable), jax.tree.leaves(trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(metrics["loss/policy_avg"]) == pytest.approx(np.mean(pg_losses), abs=1e-6)


def test_non_finite_guard_keeps_state():
    optimizer = make_optimizer(1e-2)
    update = ppo.make_ppo_update(toy_policy_fn, optimizer, ppo_epochs=2, num_minibatches=2)
    state, frozen = _init(_toy_params(), optimizer)
    state, metrics = update(state, frozen, _toy_batch(), jax.random.PRNGKey(0))  # a real Adam state
    assert bool(metrics["finite"]) and int(state.step) == 4
    before = _bits(state)

    bad = dict(_toy_batch(seed=1))
    bad["returns"] = bad["returns"].at[3, 0].set(jnp.nan)  # position 0 is always a real token
    new_state, metrics = update(state, frozen, bad, jax.random.PRNGKey(1))
    assert not bool(metrics["finite"])
    assert _bits(new_state) == before and int(new_state.step) == 4

    bad = dict(_toy_batch(seed=1))
    bad["old_values"] = bad["old_values"].at[0, 0].set(jnp.inf)  # clipped value error is inf
    new_state, metrics = update(state, frozen, bad, jax.random.PRNGKey(1))
    assert not bool(metrics["finite"]) and _bits(new_state) == before

    # NaN on padding only is harmless.
    ok = dict(_toy_batch(seed=1))
    ok["returns"] = jnp.where(ok["mask"] > 0, ok["returns"], jnp.nan)
    new_state, metrics = update(state, frozen, ok, jax.random.PRNGKey(1))
    assert bool(metrics["finite"]) and int(new_state.step) == 8 and _bits(new_state) != before


def test_update_rejects_bad_batches():
    optimizer = make_optimizer(1e-2)
    state, frozen = _init(_toy_params(), optimizer)
    update = ppo.make_ppo_update(toy_policy_fn, optimizer, ppo_epochs=1, num_minibatches=3)
    with pytest.raises(ValueError, match="batch size 8 is not divisible by num_minibatches=3"):
        update(state, frozen, _toy_batch(), jax.random.PRNGKey(0))
    update = ppo.make_ppo_update(toy_policy_fn, optimizer, ppo_epochs=1, num_minibatches=2)
    batch = _toy_batch()
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['returns'\]"):
        update(state, frozen, {k: v for k, v in batch.items() if k != "returns"}, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"batch\['advantages'\] has shape \(8, 3\)"):
        update(state, frozen, {**batch, "advantages": batch["advantages"][:, :3]}, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"batch\['tokens'\] has shape \(7, 4\)"):
        update(state, frozen, {**batch, "tokens": batch["tokens"][:7]}, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="ppo_epochs"):
        ppo.make_ppo_update(toy_policy_fn, optimizer, ppo_epochs=0, num_minibatches=1)
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(0.0)


def test_update_traces_abstractly_and_donates():
    """eval_shape (the dry run at full model shapes) needs no arrays; donation keeps results."""
    optimizer = make_optimizer(1e-2)
    state, frozen = _init(_toy_params(), optimizer)
    batch = _toy_batch()
    update = ppo.make_ppo_update(toy_policy_fn, optimizer, ppo_epochs=2, num_minibatches=4)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, frozen, batch))
    shapes, metrics = jax.eval_shape(update, *abstract, jax.random.PRNGKey(0))
    assert jax.tree.map(lambda s: s.shape, shapes.trainable) == jax.tree.map(jnp.shape, state.trainable)
    assert metrics["finite"].dtype == jnp.bool_ and metrics["loss/policy_avg"].shape == ()
    want, _ = jax.jit(update)(state, frozen, batch, jax.random.PRNGKey(0))
    copy = jax.tree.map(jnp.copy, state)
    got, _ = jax.jit(update, donate_argnums=(0,))(copy, frozen, batch, jax.random.PRNGKey(0))
    assert _bits(got) == _bits(want)
