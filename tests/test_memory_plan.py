"""Memory plan: parameter bytes per device against hand counts; estimates against their formulas
evaluated by hand and against XLA's compiled buffer sizes; the CLI."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from fisao_jax import memory
from fisao_jax.models import configs as C
from tools import memory_plan

TINY = C.LlavaConfig(
    vision=C.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14),
    text=C.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    lora=C.LoRAConfig(rank=4, alpha=8.0), image_token_id=63)
MESH = memory.MeshShape({"data": 1, "fsdp": 2, "tensor": 2})


def test_tiny_parameter_bytes_per_device_by_hand():
    pb = memory.param_bytes(TINY, MESH, dtype="bfloat16", trainable_dtype="float32")
    # Per-device elements, fsdp=2 x tensor=2: matrices split on both axes /4, one axis /2.
    # q/k/v/fc1 biases split on tensor; out/fc2 biases and the two layer norms whole
    vision_layer = (3 * 32 * 32 + 32 * 32 + 32 * 64 + 64 * 32) // 4 + (3 * 32 + 64) // 2 + 32 + 32 + 4 * 32
    # patch conv split on fsdp; class embedding, positions, pre/post layer norms whole
    vision = 14 * 14 * 3 * 32 // 2 + 32 + 5 * 32 + 4 * 32 + 2 * vision_layer
    projector = (32 * 32 + 32 * 32) // 4 + 2 * 32
    text_layer = (32 * 32 + 2 * 32 * 16 + 32 * 32 + 2 * 32 * 64 + 64 * 32) // 4 + 2 * 32
    text = 64 * 32 // 4 + 32 * 64 // 4 + 32 + 2 * text_layer  # embed, lm_head, final norm
    assert pb.weights == 2 * (vision + projector + text)
    # LoRA r=4: lora_a [in, r] on fsdp; lora_b [r, out] on fsdp x tensor (q,k,v,gate,up) or
    # on fsdp over `out` (o, down)
    lora_a = (6 * 32 * 4 + 64 * 4) // 2
    lora_b = 4 * (32 + 16 + 16 + 64 + 64) // 4 + 4 * (32 + 32) // 2
    assert pb.trainable_elements == 2 * (lora_a + lora_b) + 32 + 1  # + value head, whole
    assert pb.trainable == 4 * pb.trainable_elements
    assert pb.lora_elements_total == 2 * (4 * (6 * 32 + 64) + 4 * (32 + 16 + 16 + 64 + 64 + 32 + 32))
    # largest block gathered over fsdp: the vision embeddings (conv kernel not split on tensor)
    assert pb.gather_block == 2 * (14 * 14 * 3 * 32 + 32 + 5 * 32)


def test_tiny_estimates_equal_their_formulas_by_hand():
    work = memory.Workload(batch=4, prompt_len=10, new_tokens=6, minibatches=2, remat="none")
    p = memory.plan(TINY, MESH, work)
    assert (p.rollout_rows_per_device, p.minibatch_rows_per_device) == (2, 1)
    r = p.rows
    # S = 16; KV heads 2 split over tensor 2; rollout rows 2; bf16
    assert r["KV cache (rollout)"] == 2 * 2 * 2 * 16 * 1 * 8 * 2
    # A = b*S*[D(6e+8) + e((3H+2KVH)Dh + 6I)/t + 7re] + b(H/t)S^2(9+e), b=1
    A = 16 * (32 * 20 + 2 * ((12 + 4) * 8 + 6 * 64) / 2 + 7 * 4 * 2) + 2 * 256 * 11
    assert A == 24960
    assert r["activations (update)"] == 2 * A + 2 * 16 * 32 * 2
    assert r["logits (update)"] == 3 * 16 * 32 * 4
    assert r["AdamW moments"] == 2 * r["LoRA + value head"] == 2 * r["gradients"]
    assert r["prefill work (rollout)"] == 2 * 10 * 32 * 4 + 2 * 2 * 10 * 16 * 8 + 2 * 10 * (3 * 32 + 3 * 64 / 2) * 2
    assert r["verifier"] == 32 * 768 * 2 + 5700 * 768 * 4

    remat = memory.plan(TINY, MESH, dataclasses.replace(work, remat="layer", logits="response")).rows
    W = 2 * 256 * 8 + 16 * (4 * 32 + 3 * 64 / 2) * 4
    assert remat["activations (update)"] == 2 * 16 * (32 + 16) * 2 + A + W + 2 * 16 * 32 * 2
    assert remat["logits (update)"] == 3 * 6 * 32 * 4

    persistent = r["weights (frozen)"] + r["LoRA + value head"] + r["AdamW moments"] + r["verifier"]
    assert p.rollout == persistent + r["FSDP gather"] + r["KV cache (rollout)"] + r["prefill work (rollout)"]
    assert p.update == persistent + r["FSDP gather"] + r["gradients"] + r["activations (update)"] + r["logits (update)"]
    assert p.peak == max(p.rollout, p.update)


def test_llava_7b_weights_are_params_times_bytes_over_shards():
    cfg = C.llava_1_5_7b(C.LoRAConfig(rank=128, alpha=256))
    one = memory.param_bytes(cfg, memory.MeshShape({"fsdp": 1}))
    assert one.base_elements_total == 7_063_427_072  # transformers' count (tests/test_real_sizes.py)
    assert one.weights == 7_063_427_072 * 2
    lora = 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert one.lora_elements_total == lora == 319_815_680
    assert one.trainable == (lora + 4096 + 1) * 4

    eight = memory.param_bytes(cfg, memory.MeshShape({"fsdp": 8}))
    # whole on every device: vectors (norms, biases, class embedding) and the vision positions
    vectors = (32 * 2 + 1) * 4096 + 24 * (4 * 1024 + 4096 + 1024 + 4 * 1024) + 4 * 1024 + 1024 + 2 * 4096
    positions = 577 * 1024
    assert eight.weights == ((7_063_427_072 - vectors - positions) // 8 + vectors + positions) * 2
    # every LoRA matrix has one dimension on 'fsdp': all split 8 ways; the value head whole
    assert eight.trainable == (lora // 8 + 4097) * 4


def test_activation_estimate_close_to_xla_compiled_buffers():
    """No remat, float32: the update's activations + logits + gradients against XLA's temp size."""
    from fisao_jax.models.hf_io import abstract_params
    from fisao_jax.models.llava import LlavaModel
    from fisao_jax.policy import response_logprobs

    cfg = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, hidden_size=256, intermediate_size=688,
                                                             num_attention_heads=4, num_key_value_heads=4,
                                                             vocab_size=2048), image_token_id=2047,
                              lora=C.LoRAConfig(rank=8, alpha=16.0))
    b, T, N = 2, 40, 200
    model = LlavaModel(cfg)
    shapes = abstract_params(cfg)
    trained = lambda path: path[0] == "value_head" or path[-1] in ("lora_a", "lora_b")  # noqa: E731
    flat = {tuple(k.key for k in p): s for p, s in jax.tree_util.tree_leaves_with_path(shapes)}
    train = {p: s for p, s in flat.items() if trained(p)}
    frozen = {p: s for p, s in flat.items() if not trained(p)}

    def loss(train, frozen, ids, mask, pixels, tokens, tmask):
        params = {}
        for path, v in {**train, **frozen}.items():
            node = params
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = v
        out = response_logprobs(model, params, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
                                tokens, tmask)
        return -(out["logprobs"].sum() + out["values"].sum())

    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    compiled = jax.jit(jax.grad(loss)).lower(train, frozen, i32(b, T), i32(b, T),
                                             jax.ShapeDtypeStruct((b, 3, 28, 28), jnp.float32),
                                             i32(b, N), i32(b, N)).compile()
    xla = compiled.memory_analysis().temp_size_in_bytes
    r = memory.plan(cfg, memory.MeshShape({"fsdp": 1}),
                    memory.Workload(batch=b, prompt_len=T, new_tokens=N, dtype="float32", remat="none")).rows
    ours = r["activations (update)"] + r["logits (update)"] + r["gradients"]
    assert 0.85 <= ours / xla <= 1.3, (ours, xla)


def test_best_batch_is_the_largest_that_fits():
    work = memory.Workload(batch=2, prompt_len=10, new_tokens=6)
    base = memory.plan(TINY, MESH, work)
    acc = memory.Accelerator("toy", int((base.peak + 6 * 2**20) / 0.9), 4)
    usable = memory.usable_bytes(acc)
    best = memory.best_batch(TINY, MESH, work, acc)
    p = memory.plan(TINY, MESH, best)
    assert memory.fits(p, acc)
    rows, m = p.rollout_rows_per_device, p.minibatch_rows_per_device
    assert rows % m == 0 and best.batch == rows * 2 and best.minibatches == rows // m
    one_more = lambda r: dataclasses.replace(work, batch=r * 2, minibatches=1)  # noqa: E731
    assert memory.plan(TINY, MESH, one_more(m + 1)).update > usable  # the minibatch is as large as fits
    assert memory.plan(TINY, MESH, one_more(rows + m)).rollout > usable  # no further multiple of m fits
    assert memory.best_batch(TINY, MESH, work, memory.Accelerator("tiny", base.peak // 2, 4)) is None


def test_local_shape_and_mesh_parsing():
    mesh = memory.parse_mesh("data=2, fsdp=4,tensor=1")
    assert mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1} and mesh.size == 8
    from jax.sharding import PartitionSpec as P
    assert memory.local_shape((10, 6, 3), P("fsdp", ("data", "fsdp")), mesh) == (3, 1, 3)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        memory.parse_mesh("model=8")
    with pytest.raises(ValueError, match="bad mesh entry 'fsdp8'"):
        memory.parse_mesh("fsdp8")
    with pytest.raises(ValueError, match=r"batch over the data x fsdp devices \(6\) must be divisible by 4"):
        memory.plan(TINY, memory.MeshShape({"fsdp": 4}), memory.Workload(batch=6, prompt_len=10, new_tokens=2))
    with pytest.raises(ValueError, match="mlp/up_proj/kernel: dim 64 not divisible by mesh axis tensor"):
        memory.plan(TINY, memory.MeshShape({"tensor": 3}), memory.Workload(batch=3, prompt_len=10, new_tokens=2))


def test_cli_prints_table_and_verdict(capsys):
    rc = memory_plan.main(["--config", "llava7b", "--mesh", "data=1,fsdp=4,tensor=2", "--batch", "8",
                           "--prompt_len", "640", "--new_tokens", "512", "--lora_rank", "128", "--device", "v2-8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for row in ("weights (frozen)", "LoRA + value head", "AdamW moments", "KV cache (rollout)",
                "activations (update)", "logits (update)", "peak"):
        assert row in out
    assert "TPU v2-8: 8.0 GiB per device" in out and "-> fits" in out
    weights_gib = float(next(line for line in out.splitlines() if line.startswith("weights (frozen)")).split()[-1])
    assert weights_gib == pytest.approx(7_063_427_072 * 2 / 8 / 2**30, rel=0.01)

    assert memory_plan.main(["--mesh", "fsdp=8", "--device", "v4-8"]) == 1
    assert "TPU v4-8 has 4 devices but mesh fsdp=8 has 8" in capsys.readouterr().err
    assert memory_plan.main(["--mesh", "fsdp=8", "--device", "v5e-8", "--batch", "64"]) == 2  # does not fit
    assert "does NOT fit" in capsys.readouterr().out
    assert memory_plan.main(["--mesh", "fsdp=8", "--device", "v5e-8", "--find_batch"]) == 0
    assert "-> fits" in capsys.readouterr().out
