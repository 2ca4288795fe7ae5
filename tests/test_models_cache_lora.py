"""KV-cache decoding, LoRA and sharded forward of our LLaVA against its own full forward.

The reference for each check is an independent computation path (one full forward, the base
model without adapters, a single-device run), not a stored output."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax import sharding
from fisao_jax.models import configs as C
from fisao_jax.models.hf_io import init_params
from fisao_jax.models.llama import init_cache
from fisao_jax.models.llava import LlavaModel
from fisao_jax.models.vlm import default_position_ids
from fisao_jax.models.lora import init_lora, merge_lora, strip_lora

TINY = C.LlavaConfig(
    vision=C.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14),
    text=C.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    image_token_id=63)


def _params(cfg, seed=0):
    params = init_params(cfg, jax.random.PRNGKey(seed))
    # non-trivial value head and norms
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), params)


def _inputs(cfg, seed=0):
    rng = np.random.RandomState(seed)
    n = cfg.num_image_tokens
    rows = [[1] + [cfg.image_token_id] * n + list(rng.randint(2, 60, 6)),
            [1] + [cfg.image_token_id] * n + list(rng.randint(2, 60, 3))]
    t = max(map(len, rows))
    ids = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(rng.randn(2, 3, 28, 28).astype(np.float32))


def test_prefill_then_decode_equals_full_forward():
    model = LlavaModel(TINY)
    params = _params(TINY)
    ids, mask, pixels = _inputs(TINY)
    feats = model.apply({"params": params}, pixels, method=model.image_features)
    full = model.apply({"params": params}, ids, feats, mask, method=model.forward)
    p = ids.shape[1] - 3  # prefill all but the last 3 tokens, then decode them one by one
    cache = init_cache(TINY.text, 2, ids.shape[1])
    key_mask = jnp.concatenate([mask[:, :p], jnp.ones((2, 3), jnp.int32)], axis=1)
    pos = default_position_ids(mask)
    out = model.apply({"params": params}, ids[:, :p], feats, mask[:, :p], pos[:, :p], cache, key_mask,
                      method=model.forward)
    logits, values, cache = [out["logits"]], [out["values"]], out["cache"]
    for t in range(p, ids.shape[1]):
        out = model.apply({"params": params}, ids[:, t:t + 1], None, mask[:, t:t + 1], pos[:, t:t + 1], cache,
                          key_mask, method=model.forward)
        logits.append(out["logits"])
        values.append(out["values"])
        cache = out["cache"]
    logits = np.asarray(jnp.concatenate(logits, axis=1))
    values = np.asarray(jnp.concatenate(values, axis=1))
    valid = np.asarray(mask, bool)
    assert np.abs(logits - np.asarray(full["logits"]))[valid].max() <= 1e-5
    assert np.abs(values - np.asarray(full["values"]))[valid].max() <= 1e-5
    assert int(cache["index"]) == ids.shape[1]


def test_left_padding_does_not_change_a_rows_logits():
    model = LlavaModel(TINY)
    params = _params(TINY)
    ids, mask, pixels = _inputs(TINY)
    batched = np.asarray(model.apply({"params": params}, ids, pixels, mask))
    k = int(np.asarray(mask[1]).argmax())  # row 1 alone, without its padding
    alone = np.asarray(model.apply({"params": params}, ids[1:, k:], pixels[1:], mask[1:, k:]))
    assert np.abs(batched[1, k:] - alone[0]).max() <= 1e-5


def test_image_token_mismatch_is_a_clear_error():
    model = LlavaModel(TINY)
    params = _params(TINY)
    ids, mask, pixels = _inputs(TINY)
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        model.apply({"params": params}, ids, pixels[:1], mask)


def _lora_cfg(rank=4, alpha=8.0):
    return dataclasses.replace(TINY, lora=C.LoRAConfig(rank=rank, alpha=alpha))


def test_zero_initialised_lora_leaves_outputs_unchanged():
    base = _params(TINY)
    lcfg = _lora_cfg()
    params = init_lora(base, 4, jax.random.PRNGKey(3))
    n_lora = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(params) if "lora_a" in str(p))
    assert n_lora == 7 * TINY.text.num_hidden_layers  # q k v o gate up down in every layer
    ids, mask, pixels = _inputs(TINY)
    ref = np.asarray(LlavaModel(TINY).apply({"params": base}, ids, pixels, mask))
    out = np.asarray(LlavaModel(lcfg).apply({"params": params}, ids, pixels, mask))
    np.testing.assert_array_equal(out, ref)


def _random_lora(seed=5):
    params = init_lora(_params(TINY), 4, jax.random.PRNGKey(seed))

    def randomise(path, x):
        if str(getattr(path[-1], "key", "")) == "lora_b":
            return 0.3 * jax.random.normal(jax.random.PRNGKey(len(str(path))), x.shape)
        return x
    return jax.tree_util.tree_map_with_path(randomise, params)


def test_merged_lora_equals_unmerged():
    lcfg = _lora_cfg()
    params = _random_lora()
    ids, mask, pixels = _inputs(TINY)
    unmerged = np.asarray(LlavaModel(lcfg).apply({"params": params}, ids, pixels, mask))
    merged = np.asarray(LlavaModel(TINY).apply({"params": merge_lora(params, 8.0, 4)}, ids, pixels, mask))
    base = np.asarray(LlavaModel(TINY).apply({"params": strip_lora(params)}, ids, pixels, mask))
    valid = np.asarray(mask, bool)
    assert np.abs(unmerged - base)[valid].max() > 1e-2  # the adapters do something
    assert np.abs(unmerged - merged)[valid].max() <= 1e-5


def test_lora_switched_off_equals_base_model():
    lcfg = _lora_cfg()
    params = _random_lora()
    ids, mask, pixels = _inputs(TINY)
    off = np.asarray(LlavaModel(lcfg).apply({"params": params}, ids, pixels, mask, use_lora=False))
    base = np.asarray(LlavaModel(TINY).apply({"params": strip_lora(params)}, ids, pixels, mask))
    np.testing.assert_array_equal(off, base)


def test_forward_on_8_device_mesh_equals_single_device():
    assert jax.device_count() == 8, "tests/conftest.py should fake 8 CPU devices"
    lcfg = _lora_cfg()
    params = _random_lora()
    model = LlavaModel(lcfg)
    ids, mask, pixels = _inputs(TINY)
    ids, mask, pixels = (jnp.concatenate([x, x[::-1]]) for x in (ids, mask, pixels))  # batch 4
    single = np.asarray(jax.jit(model.apply)({"params": params}, ids, pixels, mask))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = sharding.shard_params(params, mesh)
    q = sharded["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert len({str(s.index) for s in q.addressable_shards}) == 4  # really split over fsdp x tensor
    ids_s = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    mask_s = jax.device_put(mask, sharding.batch_sharding(mesh, 2))
    pix_s = jax.device_put(pixels, sharding.batch_sharding(mesh, 4))
    out = np.asarray(jax.jit(model.apply)({"params": sharded}, ids_s, pix_s, mask_s))
    assert np.abs(out - single).max() <= 1e-5


def test_unmatched_parameter_is_named():
    params = {"language_model": {"mystery": {"kernel": jnp.zeros((4, 4))}}}
    with pytest.raises(ValueError, match="language_model/mystery/kernel"):
        sharding.partition_specs(params)


def test_indivisible_dimension_is_named():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    params = {"lm_head": {"kernel": jnp.zeros((32, 12))}}
    with pytest.raises(ValueError, match="lm_head/kernel: dim 12 not divisible"):
        sharding.partition_specs(params, mesh=mesh)


def test_remat_gives_the_same_loss_and_gradients():
    lcfg = _lora_cfg()
    params = _random_lora()
    ids, mask, pixels = _inputs(TINY)

    def loss(p, model):
        return jnp.mean(model.apply({"params": p}, ids, pixels, mask) ** 2)
    plain = jax.value_and_grad(loss)(params, LlavaModel(lcfg))
    remat = jax.value_and_grad(loss)(params, LlavaModel(lcfg, remat=True))
    assert abs(float(plain[0]) - float(remat[0])) <= 1e-6
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_generated_image_token_is_embedded_as_text_in_both_paths():
    """A sampled image-token id gets no image features: rollout and teacher forcing agree."""
    from fisao_jax.policy import response_logprobs
    from fisao_jax.rollout import SamplingConfig, make_rollout

    model, params = LlavaModel(TINY), _params(TINY)
    ids, mask, pixels = (jnp.concatenate([x] * 4) for x in _inputs(TINY))
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    cfg = SamplingConfig(max_new_tokens=24, temperature=20.0, eos_token_id=1)  # near-uniform sampling
    out = make_rollout(model, cfg)(params, batch, jax.random.PRNGKey(4))
    generated = np.asarray(out.tokens)[np.asarray(out.mask, bool)]
    assert (generated == TINY.image_token_id).sum() >= 2, "this key samples the image token"
    tf = response_logprobs(model, params, batch, out.tokens, out.mask, temperature=20.0)
    m = np.asarray(out.mask, bool)
    assert np.abs(np.asarray(out.logprobs) - np.asarray(tf["logprobs"]))[m].max() <= 1e-5
