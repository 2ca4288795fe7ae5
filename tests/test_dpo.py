"""DPO: the loss against a NumPy transcription of Rafailov et al. (2023) Eqn 7, its gradient
against the closed form and against finite differences through a tiny LLaVA, sequence
log-probs against a full forward, and the one-jit update against hand-made SGD steps.

Every jitted function is built once per module (compiling dominates the run time)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fisao_jax.methods import dpo
from fisao_jax.models import configs as C
from fisao_jax.models.hf_io import init_params
from fisao_jax.models.llava import LlavaModel
from fisao_jax.params import merge_params, split_params
from fisao_jax.train_state import TrainState

TINY = C.LlavaConfig(
    vision=C.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14),
    text=C.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
    # the image token lies outside the vocabulary so that sampling can never produce it
    lora=C.LoRAConfig(rank=4, alpha=8.0), image_token_id=40)
MODEL = LlavaModel(TINY)
LR, BETA = 0.05, 0.2


@jax.jit
def _init(key):
    params = init_params(TINY, key)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def tiny_llava(seed: int = 0):
    """(model, params) of a random tiny LLaVA with non-zero LoRA B (so every adapter leaf has a gradient)."""
    return MODEL, _init(jax.random.PRNGKey(seed))


def tiny_pairs(num: int = 4, seed: int = 0) -> dict:
    """Prompts with 1-3 text tokens after the image (left-padded) and two responses per
    prompt of different lengths (right-padded)."""
    rng = np.random.RandomState(seed)
    n_img, t, n = TINY.num_image_tokens, TINY.num_image_tokens + 4, 5
    ids, mask = np.zeros((num, t), np.int32), np.zeros((num, t), np.int32)
    for i in range(num):
        row = [1] + [TINY.image_token_id] * n_img + list(rng.randint(3, 30, 1 + i % 3))
        ids[i, t - len(row):], mask[i, t - len(row):] = row, 1
    size = TINY.vision.image_size
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": rng.randn(num, 3, size, size).astype(np.float32)}
    for name in ("chosen", "rejected"):
        toks, m = np.zeros((num, n), np.int32), np.zeros((num, n), np.int32)
        for i in range(num):
            k = rng.randint(1, n + 1)
            toks[i, :k], m[i, :k] = rng.randint(2, 30, k), 1
        out[f"{name}_tokens"], out[f"{name}_mask"] = toks, m
    return out


_forward = jax.jit(lambda p, i, x, m: MODEL.apply({"params": p}, i, x, m))
_pair_logprobs = jax.jit(lambda p, b: dpo.pair_logprobs(MODEL, p, b))
_core = jax.jit(dpo.make_dpo_update(MODEL, optax.sgd(LR), beta=BETA, num_minibatches=2))


def _update(state, frozen, batch):
    return state.apply(_core, frozen, batch, jax.random.PRNGKey(0))


def _state(params):
    trainable, frozen = split_params(params)
    return TrainState(trainable, optax.sgd(LR).init(trainable), jnp.zeros((), jnp.int32)), frozen


def full_forward_logprobs(params, b: dict, name: str) -> np.ndarray:
    """Sum of log-probs of response `name` from one full forward, log-softmax in NumPy (float64)."""
    ids, mask, tokens, resp = b["input_ids"], b["attention_mask"], b[f"{name}_tokens"], b[f"{name}_mask"]
    logits = np.asarray(_forward(params, np.concatenate([ids, tokens], 1), b["pixel_values"],
                                 np.concatenate([mask, resp], 1)), np.float64)
    t = ids.shape[1]
    out = np.zeros(len(ids))
    for r in range(len(ids)):
        for i in range(tokens.shape[1]):
            if resp[r, i]:
                z = logits[r, t - 1 + i]
                out[r] += z[tokens[r, i]] - (z.max() + np.log(np.exp(z - z.max()).sum()))
    return out


def numpy_dpo(pc, pr, rc, rr, beta, w):
    margin = beta * ((pc - rc) - (pr - rr))
    return np.sum(w * np.log1p(np.exp(-margin))) / np.sum(w), margin


def test_dpo_loss_and_stats_match_numpy():
    rng = np.random.RandomState(0)
    pc, pr, rc, rr = (rng.randn(6) * 5 for _ in range(4))
    w = np.array([1, 1, 0, 1, 1, 0], np.float64)
    loss, stats = dpo.dpo_loss(pc, pr, rc, rr, 0.3, w)
    ref, margin = numpy_dpo(pc, pr, rc, rr, 0.3, w)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    keep = w > 0
    np.testing.assert_allclose(float(stats["rewards/chosen"]), np.mean(0.3 * (pc - rc)[keep]), rtol=1e-5)
    np.testing.assert_allclose(float(stats["rewards/rejected"]), np.mean(0.3 * (pr - rr)[keep]), rtol=1e-5)
    np.testing.assert_allclose(float(stats["rewards/margins"]), np.mean(margin[keep]), rtol=1e-5)
    assert float(stats["rewards/accuracies"]) == pytest.approx(np.mean(margin[keep] > 0))
    # a hand value: margin 0 gives log 2
    assert float(dpo.dpo_loss(1.0, 2.0, 1.0, 2.0, 0.1)[0]) == pytest.approx(np.log(2.0), rel=1e-6)


def test_dpo_loss_gradient_is_the_closed_form():
    rng = np.random.RandomState(1)
    pc, pr, rc, rr = (jnp.asarray(rng.randn(5) * 3, jnp.float32) for _ in range(4))
    w = jnp.asarray([1.0, 0.0, 1.0, 1.0, 1.0])
    beta = 0.5
    g_c, g_r = jax.grad(lambda a, b: dpo.dpo_loss(a, b, rc, rr, beta, w)[0], argnums=(0, 1))(pc, pr)
    margin = beta * ((np.asarray(pc) - np.asarray(rc)) - (np.asarray(pr) - np.asarray(rr)))
    expect = -beta * (1.0 / (1.0 + np.exp(margin))) * np.asarray(w) / np.sum(np.asarray(w))
    np.testing.assert_allclose(np.asarray(g_c), expect, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_r), -expect, rtol=1e-5, atol=1e-7)


def test_sequence_logprobs_match_a_full_forward():
    _, params = tiny_llava()
    b = tiny_pairs()
    chosen, rejected = _pair_logprobs(params, b)
    np.testing.assert_allclose(np.asarray(chosen), full_forward_logprobs(params, b, "chosen"), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(rejected), full_forward_logprobs(params, b, "rejected"), rtol=2e-4,
                               atol=2e-4)


def _batch(b, ref_c, ref_r, weight):
    out = {k: jnp.asarray(v) for k, v in b.items()}
    out.update(ref_chosen_logp=jnp.asarray(ref_c, jnp.float32), ref_rejected_logp=jnp.asarray(ref_r, jnp.float32),
               weight=jnp.asarray(weight, jnp.float32))
    return out


@functools.partial(jax.jit, static_argnums=())
@functools.partial(jax.grad, argnums=0)
def _reference_grad(trainable, frozen, b, ref_c, ref_r, weight):
    """Gradient of an independent DPO loss: full forward, log-softmax, gather, Eqn 7."""
    params = merge_params(trainable, frozen)
    t = b["input_ids"].shape[1]
    lp = {}
    for name in ("chosen", "rejected"):
        ids = jnp.concatenate([b["input_ids"], b[f"{name}_tokens"]], 1)
        mask = jnp.concatenate([b["attention_mask"], b[f"{name}_mask"]], 1)
        logp = jax.nn.log_softmax(MODEL.apply({"params": params}, ids, b["pixel_values"], mask)[:, t - 1:-1], -1)
        picked = jnp.take_along_axis(logp, b[f"{name}_tokens"][..., None], -1)[..., 0]
        lp[name] = jnp.sum(picked * b[f"{name}_mask"], -1)
    margin = BETA * ((lp["chosen"] - ref_c) - (lp["rejected"] - ref_r))
    return jnp.sum(weight * jnp.log1p(jnp.exp(-margin))) / jnp.sum(weight)


def test_update_is_sgd_on_the_reference_gradient_minibatch_by_minibatch():
    _, params = tiny_llava(seed=2)
    b = {k: jnp.asarray(v) for k, v in tiny_pairs(seed=3).items()}
    ref_c, ref_r = np.array([-20.0, -15.0, -30.0, -8.0]), np.array([-18.0, -25.0, -10.0, -9.0])
    weight = np.array([1.0, 1.0, 0.0, 1.0])
    state, frozen = _state(params)
    new, metrics = _update(state, frozen, _batch(b, ref_c, ref_r, weight))
    assert bool(metrics["finite"]) and int(new.step) == 2

    trainable = state.trainable
    # minibatch m = rows m, M + m, ... (fisao_jax.update.minibatches), in order, each one SGD step
    for half in (np.array([0, 2]), np.array([1, 3])):
        g = _reference_grad(trainable, frozen, {k: v[half] for k, v in b.items()}, jnp.asarray(ref_c[half]),
                            jnp.asarray(ref_r[half]), jnp.asarray(weight[half]))
        trainable = jax.tree.map(lambda p, gr: p - LR * gr, trainable, g)
    for got, want in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(trainable)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    moved = max(float(jnp.abs(a - c).max()) for a, c in zip(jax.tree.leaves(new.trainable),
                                                             jax.tree.leaves(state.trainable)))
    assert moved > 1e-4


def test_update_gradient_matches_finite_differences_of_the_numpy_loss():
    _, params = tiny_llava(seed=4)
    b = tiny_pairs(seed=5)
    ref_c, ref_r = np.array([-20.0, -15.0, -12.0, -9.0]), np.array([-18.0, -17.0, -14.0, -9.0])
    weight = np.array([1.0, 0.0, 1.0, 0.0])  # minibatch 1 (rows 1, 3) empty: one SGD step on rows 0, 2
    state, frozen = _state(params)
    new, _ = _update(state, frozen, _batch(b, ref_c, ref_r, weight))
    grad = jax.tree.map(lambda a, c: (a - c) / LR, state.trainable, new.trainable)

    def numpy_loss(trainable):  # our sequence log-probs, the loss in NumPy
        c, r = (np.asarray(x, np.float64)[[0, 2]] for x in _pair_logprobs(merge_params(trainable, frozen), b))
        return numpy_dpo(c, r, ref_c[[0, 2]], ref_r[[0, 2]], BETA, weight[[0, 2]])[0]

    keys = iter(jax.random.split(jax.random.PRNGKey(9), 1000))
    direction = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), state.trainable)
    eps = 1e-3  # LoRA is bilinear in (A, B): larger steps see the curvature
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, state.trainable, direction)  # noqa: E731
    numeric = (numpy_loss(shifted(1.0)) - numpy_loss(shifted(-1.0))) / (2 * eps)
    analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=3e-2)


def test_padding_rows_and_non_finite_batches_change_nothing():
    _, params = tiny_llava(seed=6)
    b = tiny_pairs(seed=7)
    state, frozen = _state(params)
    for ref_c, weight, finite in (([-3.0, -4.0, -1.0, -2.0], [0.0] * 4, True),
                                  ([np.nan, -4.0, -1.0, -2.0], [1.0] * 4, False)):
        new, metrics = _update(state, frozen, _batch(b, ref_c, [-5.0, -6.0, -1.0, -1.0], weight))
        assert bool(metrics["finite"]) == finite and int(new.step) == 0
        for got, want in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(state.trainable)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_lora_dropout_is_active_in_the_dpo_step_and_off_in_the_reference():
    """model.lora_dropout > 0: the training pass drops adapter inputs (two keys, two updates),
    the reference log-probs (and a dropout of 0) do not depend on the key."""
    import dataclasses

    drop_model = LlavaModel(dataclasses.replace(TINY, lora=C.LoRAConfig(rank=4, alpha=8.0, dropout=0.5)))
    _, params = tiny_llava(seed=10)
    b = tiny_pairs(seed=11)
    ref = jax.jit(lambda p, x: dpo.pair_logprobs(drop_model, p, x))
    np.testing.assert_array_equal(np.asarray(ref(params, b)[0]), np.asarray(_pair_logprobs(params, b)[0]))
    step = jax.jit(dpo.make_dpo_update(drop_model, optax.sgd(LR), beta=BETA, num_minibatches=2))
    state, frozen = _state(params)
    batch = _batch(b, [-20.0, -15.0, -30.0, -8.0], [-18.0, -25.0, -10.0, -9.0], [1.0] * 4)
    a, _ = state.apply(step, frozen, batch, jax.random.PRNGKey(1))
    c, _ = state.apply(step, frozen, batch, jax.random.PRNGKey(2))
    again, _ = state.apply(step, frozen, batch, jax.random.PRNGKey(1))
    leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(s.trainable)]  # noqa: E731
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(again)))
    # without dropout the key changes nothing
    d, _ = _update(state, frozen, batch)
    e, _ = state.apply(_core, frozen, batch, jax.random.PRNGKey(7))
    assert all(np.array_equal(x, y) for x, y in zip(leaves(d), leaves(e)))
