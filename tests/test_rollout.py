"""Rollout: greedy parity with transformers generate, log-probs vs teacher forcing (float32
and bf16, with trained-looking adapters), sampling statistics, determinism, sharded equality
and input validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax.models import hf_io
from fisao_jax import sharding
from fisao_jax.models.configs import LoRAConfig
from fisao_jax.placement import Layout
from fisao_jax.policy import response_logprobs
from fisao_jax.rollout import SamplingConfig, first_argmax, make_rollout, sample_token

torch = pytest.importorskip("torch")
import hf_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    hf_model = hf_tiny.save_llava(root, seed=3)
    module, params = hf_io.from_hf(root)
    return hf_model, module, params


def _batch(module, seed=0):
    # three prompts of different lengths, left padded
    ids, mask, pixels, _ = hf_tiny.llava_inputs(module.cfg.num_image_tokens, (1, 1, 1), (0, 3, 5), seed=seed)
    return ids, mask, pixels


def _dict(ids, mask, pixels):
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "pixel_values": jnp.asarray(pixels)}


def _trained_adapters(root, dtype):
    """The tiny model with LoRA adapters that change its outputs (B != 0) and a non-zero value head."""
    module, params = hf_io.from_hf(root, dtype=dtype, lora=LoRAConfig(rank=4, alpha=8.0),
                                   lora_key=jax.random.PRNGKey(0))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))

    def perturb(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "lora_b" or path[0].key == "value_head":
            return (x + 0.3 * jax.random.normal(next(keys), x.shape)).astype(x.dtype)
        return x
    return module, jax.tree_util.tree_map_with_path(perturb, params)


@pytest.mark.parametrize("chunk", [0, 5])  # one decode loop; loops of 5, 5 and 2 steps
def test_greedy_matches_transformers_generate(tiny, chunk):
    hf_model, module, params = tiny
    n = 12
    cfg = SamplingConfig(max_new_tokens=n, greedy=True, eos_token_id=2, pad_token_id=0, decode_chunk=chunk)
    for seed in (0, 1):
        ids, mask, pixels = _batch(module, seed)
        out = make_rollout(module, cfg)(params, _dict(ids, mask, pixels), jax.random.PRNGKey(0))
        with torch.no_grad():
            ref = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                    pixel_values=torch.tensor(pixels), max_new_tokens=n, do_sample=False,
                                    eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:].numpy()
        ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])))
        np.testing.assert_array_equal(np.asarray(out.tokens), ref)
        assert len(set(map(tuple, ref))) == 3  # different prompts, different continuations


@pytest.mark.parametrize("chunk", [0, 4])
def test_logprobs_equal_teacher_forced_pass(tiny, tmp_path, chunk):
    hf_model, _, _ = tiny
    hf_model.save_pretrained(tmp_path)
    module, params = _trained_adapters(tmp_path, jnp.float32)
    batch = _dict(*_batch(module))
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=20, eos_token_id=5, decode_chunk=chunk)
    out = make_rollout(module, cfg)(params, batch, jax.random.PRNGKey(1))
    tf = response_logprobs(module, params, batch, out.tokens, out.mask, temperature=0.7)
    base = response_logprobs(module, params, batch, out.tokens, out.mask, temperature=0.7, use_lora=False)
    m = np.asarray(out.mask, bool)
    assert np.abs(np.asarray(out.logprobs) - np.asarray(tf["logprobs"]))[m].max() <= 1e-5
    # the adapters matter: without them the log-probs are far off
    assert np.abs(np.asarray(base["logprobs"]) - np.asarray(tf["logprobs"]))[m].max() > 1e-2


def test_bf16_rollout_logprobs_are_close_to_teacher_forcing(tiny, tmp_path):
    """In bf16 the KV-cache decode and the full teacher-forced pass round differently; the
    trainers therefore take old log-probs from the teacher-forced pass (scoring), and the
    rollout's own stay within bf16 rounding of it."""
    hf_model, _, _ = tiny
    hf_model.save_pretrained(tmp_path)
    module, params = _trained_adapters(tmp_path, jnp.bfloat16)
    batch = _dict(*_batch(module))
    out = make_rollout(module, SamplingConfig(max_new_tokens=10, temperature=1.0, eos_token_id=5))(
        params, batch, jax.random.PRNGKey(2))
    tf = response_logprobs(module, params, batch, out.tokens, out.mask)
    m = np.asarray(out.mask, bool)
    diff = np.abs(np.asarray(out.logprobs) - np.asarray(tf["logprobs"]))[m]
    assert diff.mean() <= 0.05 and diff.max() <= 0.25, (diff.mean(), diff.max())


def test_stops_at_eos_and_pads_after(tiny):
    _, module, params = tiny
    batch = _dict(*_batch(module))
    # make every token an EOS candidate by sampling: pick an EOS that the first step produces
    probe = make_rollout(module, SamplingConfig(max_new_tokens=3, greedy=True))(params, batch, jax.random.PRNGKey(0))
    eos = int(probe.tokens[0, 1])
    out = make_rollout(module, SamplingConfig(max_new_tokens=6, greedy=True, eos_token_id=eos, pad_token_id=0,
                                              decode_chunk=2))(params, batch, jax.random.PRNGKey(0))
    toks, msk = np.asarray(out.tokens), np.asarray(out.mask)
    for row_t, row_m in zip(toks, msk):
        hits = np.flatnonzero(row_t == eos)
        end = hits[0] + 1 if len(hits) else len(row_t)
        assert row_m[:end].all() and not row_m[end:].any()
        assert (row_t[end:] == 0).all()
    assert msk[0].sum() <= 2


def test_sampling_is_deterministic_for_a_key(tiny):
    _, module, params = tiny
    batch = _dict(*_batch(module))
    roll = make_rollout(module, SamplingConfig(max_new_tokens=8, temperature=1.0))
    a = roll(params, batch, jax.random.PRNGKey(7))
    b = roll(params, batch, jax.random.PRNGKey(7))
    c = roll(params, batch, jax.random.PRNGKey(8))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_first_argmax_and_token_logprob_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [7, 300, 999]] = 50.0        # ties: the first index wins, as np.argmax
    x[2, -1] = 60.0                   # maximum in the last slot
    x[3] = -np.inf
    x[3, 5] = 0.0                     # one finite logit among -inf
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))

    cfg = SamplingConfig(greedy=True, temperature=0.7)
    tok, logp = sample_token(jnp.asarray(x), jax.random.PRNGKey(0), cfg)
    scaled = x.astype(np.float64) / 0.7
    ref = scaled - scaled.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    rows = np.arange(len(x))
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(x, axis=-1))
    np.testing.assert_allclose(np.asarray(logp), ref[rows, np.argmax(x, axis=-1)], atol=1e-5)


def test_sampling_draws_what_jax_random_categorical_draws():
    """The Gumbel-max sampler gives jax.random.categorical's tokens for a key."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (64, 50)) * 3
    cfg = SamplingConfig(temperature=1.0)
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        tok, _ = sample_token(logits, key, cfg)
        np.testing.assert_array_equal(np.asarray(tok), np.asarray(jax.random.categorical(key, logits, axis=-1)))


def _peaked(params, factor=30.0):
    """A sharper next-token distribution, so that wrong samplers are distinguishable."""
    lm = params["lm_head"]["kernel"]
    return {**params, "lm_head": {"kernel": lm * factor}}


def _first_token_counts(module, params, cfg, rows=4000, seed=0):
    params = _peaked(params)
    ids, mask, pixels = _batch(module)
    ids, mask, pixels = (jnp.asarray(np.repeat(x[:1], rows, axis=0)) for x in (ids, mask, pixels))
    out = make_rollout(module, dataclasses.replace(cfg, max_new_tokens=1))(params, _dict(ids, mask, pixels),
                                                                              jax.random.PRNGKey(seed))
    logits = module.apply({"params": params}, ids[:1], pixels[:1], mask[:1])[0, -1] / cfg.temperature
    return np.bincount(np.asarray(out.tokens[:, 0]), minlength=logits.shape[-1]), np.asarray(logits)


def _chi2_pvalue(counts, probs, min_expected=5.0):
    from scipy import stats
    n = counts.sum()
    exp = probs * n
    big = exp >= min_expected  # pool the rare tokens into one cell
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(exp[big], exp[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep].astype(np.float64), exp[keep].astype(np.float64)
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_sampled_frequencies_match_softmax(tiny):
    _, module, params = tiny
    cfg = SamplingConfig(temperature=0.5)
    counts, logits = _first_token_counts(module, params, cfg)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert _chi2_pvalue(counts, probs) > 1e-3
    # the test can fail: a wrong distribution (temperature 1 instead of 0.5) is rejected
    wrong = np.exp(logits * 0.5 - (logits * 0.5).max())
    assert _chi2_pvalue(counts, wrong / wrong.sum()) < 1e-6


def test_top_k_and_top_p_truncate_and_renormalise(tiny):
    _, module, params = tiny
    counts, logits = _first_token_counts(module, params, SamplingConfig(temperature=0.3, top_k=4), seed=1)
    top = np.argsort(-logits)[:4]
    assert set(np.flatnonzero(counts)) <= set(top)
    p = np.exp(logits[top] - logits[top].max())
    assert _chi2_pvalue(counts[top], p / p.sum()) > 1e-3

    counts, logits = _first_token_counts(module, params, SamplingConfig(temperature=4.0, top_p=0.6), seed=2)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.6)) + 1]
    assert len(nucleus) >= 3 and len(nucleus) < len(probs) // 2  # the truncation is non-trivial
    assert set(np.flatnonzero(counts)) <= set(nucleus)
    p = probs[nucleus] / probs[nucleus].sum()
    assert _chi2_pvalue(counts[nucleus], p) > 1e-3


def test_greedy_on_8_device_mesh_equals_single_device(tiny):
    _, module, params = tiny
    ids, mask, pixels = _batch(module)
    ids, mask, pixels = (np.concatenate([x, x[:1]]) for x in (ids, mask, pixels))  # batch 4
    cfg = SamplingConfig(max_new_tokens=8, greedy=True, decode_chunk=0)
    single = make_rollout(module, cfg)(params, _dict(ids, mask, pixels), jax.random.PRNGKey(0))
    layout = Layout(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    shardings = layout.params(params)
    p = jax.device_put(params, shardings)
    batch = layout.put_batch({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
    cfg = dataclasses.replace(cfg, decode_chunk=3)  # and decoding in loops of 3, 3, 2 steps on the mesh
    out = make_rollout(module, cfg, layout, shardings)(p, batch, jax.random.PRNGKey(0))
    assert out.tokens.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(single.logprobs), atol=1e-5)


def test_bad_inputs_fail_before_compiling(tiny):
    _, module, params = tiny
    batch = _dict(*_batch(module))
    roll = make_rollout(module, SamplingConfig(max_new_tokens=200))
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        roll(params, batch, jax.random.PRNGKey(0))
    roll = make_rollout(module, SamplingConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        roll(params, {**batch, "pixel_values": batch["pixel_values"][:2]}, jax.random.PRNGKey(0))
    assert roll.jitted._cache_size() == 0
    with pytest.raises(ValueError, match="decode_chunk must be >= 0"):
        make_rollout(module, SamplingConfig(max_new_tokens=4, decode_chunk=-1))(params, batch, jax.random.PRNGKey(0))
