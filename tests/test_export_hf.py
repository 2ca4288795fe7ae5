"""Export to Hugging Face: our LLaVA with LoRA -> HF folder -> transformers' logits equal ours.

The reference is transformers' own PyTorch LLaVA loading the exported folder; merge precision
is checked against a numpy computation and dtype casts against torch's."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import hf_tiny  # noqa: E402
from fisao_jax.models import hf_io
from fisao_jax import export, lora_adapter  # noqa: E402
from fisao_jax.lora_adapter import ExportError  # noqa: E402
from fisao_jax.models import configs as C  # noqa: E402
from fisao_jax.models.safetensors_io import read_shapes  # noqa: E402
from tools import convert_hf, export_hf  # noqa: E402

LORA = C.LoRAConfig(rank=4, alpha=8.0)
TOKENIZER_STUBS = {"tokenizer_config.json": '{"model_max_length": 2048}',
                   "preprocessor_config.json": '{"crop_size": {"height": 28, "width": 28}}'}
HF_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
               "multi_modal_projector.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF LLaVA (GQA), its converted copy, and tokenizer stub files."""
    root = tmp_path_factory.mktemp("export")
    base_model = hf_tiny.save_llava(root / "hf", gqa=True)
    for name, text in TOKENIZER_STUBS.items():
        (root / "hf" / name).write_text(text)
    assert convert_hf.main(["--src", str(root / "hf"), "--dst", str(root / "converted")]) == 0
    return root, base_model


def _random_lora(params, seed=0, scale=0.05):
    """Non-zero lora_b everywhere, so the adapter changes the model."""
    count = [0]

    def visit(path, x):
        if str(path[-1].key) == "lora_b":
            count[0] += 1
            return scale * jax.random.normal(jax.random.PRNGKey(seed * 1000 + count[0]), x.shape, x.dtype)
        return x

    out = jax.tree_util.tree_map_with_path(visit, params)
    assert count[0] == 2 * 7  # 2 layers x 7 linear layers
    return out


def _hf_logits(folder, ids, mask, pixels, dtype=torch.float32):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder, attn_implementation="eager", dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels, dtype=dtype),
                     attention_mask=torch.tensor(mask)).logits.float().numpy()


def _our_logits(module, params, ids, mask, pixels):
    return np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))


def _inputs(module):
    return hf_tiny.llava_inputs(module.cfg.num_image_tokens, images_per_row=(1, 1), pads=(3, 0))


def _written_keys(folder):
    return set(read_shapes(folder))


def test_exported_folder_gives_our_logits_in_transformers(tiny, tmp_path):
    root, base_model = tiny
    module, params = hf_io.from_hf(root / "hf", lora=LORA, lora_key=jax.random.PRNGKey(1))
    params = _random_lora(params)
    summary = export.export_llava(params, module.cfg, tmp_path / "out", tokenizer_dir=root / "hf",
                                  dtype="float32", progress=False)
    assert summary.weight_files == ["model.safetensors"]

    ids, mask, pixels, _ = _inputs(module)
    ref = _hf_logits(tmp_path / "out", ids, mask, pixels)
    ours = _our_logits(module, params, ids, mask, pixels)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() <= 1e-4
    assert np.abs(ref[valid]).max() > 0.05
    # the adapter really is in there: the base model's logits differ
    with torch.no_grad():
        base = base_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                          attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(base - ref)[valid].max() > 1e-2

    keys = _written_keys(tmp_path / "out")
    assert all(k.startswith(HF_PREFIXES) for k in keys), sorted(k for k in keys if not k.startswith(HF_PREFIXES))
    # every tensor transformers itself saved for this model, under the same names
    hf_keys = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) for k in _written_keys(root / "hf")}
    assert keys == hf_keys
    for name, text in TOKENIZER_STUBS.items():
        assert (tmp_path / "out" / name).read_text() == text
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["image_seq_length"] == 4


def test_config_without_head_dim_exports(tiny, tmp_path):
    """A hand-made config may leave head_dim None (derived from hidden / heads); config.json
    spells it out, and the export still checks and loads in transformers."""
    import dataclasses

    root, _ = tiny
    module, params = hf_io.from_hf(root / "hf", lora=LORA, lora_key=jax.random.PRNGKey(1))
    cfg = dataclasses.replace(module.cfg, text=dataclasses.replace(module.cfg.text, head_dim=None))
    export.export_llava(params, cfg, tmp_path / "out", dtype="float32", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert written["head_dim"] == written["hidden_size"] // written["num_attention_heads"]
    ids, mask, pixels, _ = _inputs(module)
    ref = _hf_logits(tmp_path / "out", ids, mask, pixels)
    assert np.abs(_our_logits(module, params, ids, mask, pixels) - ref)[mask.astype(bool)].max() <= 1e-4


def test_cli_adapter_on_converted_folder_sharded_round_trip(tiny, tmp_path):
    root, _ = tiny
    module, params = hf_io.from_hf(root / "converted", lora=LORA, lora_key=jax.random.PRNGKey(2))
    params = _random_lora(params, seed=3)
    lora_adapter.save_adapter(params, LORA, tmp_path / "adapter", base=root / "converted")
    out = tmp_path / "hf_out"
    assert export_hf.main(["--ckpt", str(tmp_path / "adapter"), "--dst", str(out), "--dtype", "float32",
                           "--max_shard_size", "100KB", "--quiet"]) == 0

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((out / f).stat().st_size <= 100_000 + 20_000 for f in files)  # header + one tensor over at most
    assert index["metadata"]["total_size"] == sum(int(np.prod(s)) * 4 for s in read_shapes(out).values())
    for name, text in TOKENIZER_STUBS.items():  # copied hf -> converted -> export
        assert (out / name).read_text() == text

    ids, mask, pixels, _ = _inputs(module)
    ref = _hf_logits(out, ids, mask, pixels)
    ours = _our_logits(module, params, ids, mask, pixels)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4


def test_adapter_save_load_round_trip_and_value_head(tiny, tmp_path):
    root, _ = tiny
    module, params = hf_io.from_hf(root / "converted", lora=LORA, lora_key=jax.random.PRNGKey(4))
    params = _random_lora(params, seed=5)
    params["value_head"]["kernel"] = params["value_head"]["kernel"] + 0.5
    lora_adapter.save_adapter(params, LORA, tmp_path / "a")
    adapter = lora_adapter.load_adapter(tmp_path / "a" / lora_adapter.ADAPTER_WEIGHTS)
    assert adapter.lora == LORA and adapter.base is None
    assert len(adapter.tensors) == 2 * 7 * 2 + 2
    _, base = hf_io.from_hf(root / "converted")
    restored = lora_adapter.apply_adapter(base, adapter)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_get(restored, path)))


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export_equals_torch_cast_of_float32_export(tiny, tmp_path, dtype):
    from safetensors import safe_open

    root, _ = tiny
    module, params = hf_io.from_hf(root / "hf", lora=LORA, lora_key=jax.random.PRNGKey(6))
    params = _random_lora(params, seed=7)
    export.export_llava(params, module.cfg, tmp_path / "f32", dtype="float32", progress=False)
    export.export_llava(params, module.cfg, tmp_path / "half", dtype=dtype, progress=False)
    with safe_open(tmp_path / "f32" / "model.safetensors", "pt") as f32, \
            safe_open(tmp_path / "half" / "model.safetensors", "pt") as half:
        assert set(f32.keys()) == set(half.keys())
        for k in f32.keys():
            want = f32.get_tensor(k).to(getattr(torch, dtype))
            got = half.get_tensor(k)
            assert got.dtype == want.dtype and torch.equal(got, want), k
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == dtype


def test_lora_merged_in_float32_before_the_cast(tiny, tmp_path):
    """bf16 base kernel + an update below bf16 resolution: kept by a float16 export."""
    from safetensors import safe_open

    root, _ = tiny
    module, params = hf_io.from_hf(root / "hf", param_dtype=jnp.bfloat16, lora=LORA,
                                       lora_key=jax.random.PRNGKey(8))
    params = _random_lora(params, seed=9, scale=2e-3)
    export.export_llava(params, module.cfg, tmp_path / "out", dtype="float16", progress=False)
    q = params["language_model"]["layers_1"]["self_attn"]["q_proj"]
    f32 = lambda x: np.asarray(x).astype(np.float32)  # noqa: E731
    merged = f32(q["kernel"]) + (LORA.alpha / LORA.rank) * (f32(q["lora_a"]) @ f32(q["lora_b"]))
    with safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
        got = f.get_tensor("language_model.model.layers.1.self_attn.q_proj.weight")
    np.testing.assert_array_equal(got, merged.T.astype(np.float16))
    bf16_first = merged.astype(jnp.bfloat16).astype(np.float16)
    assert (bf16_first.T != got).mean() > 0.1  # an intermediate bf16 kernel would lose the update


def test_errors_name_the_fault_and_leave_nothing(tiny, tmp_path, capsys):
    root, _ = tiny
    module, params = hf_io.from_hf(root / "hf")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_llava(params, module.cfg, tmp_path / "exists", progress=False)
    assert export_hf.main(["--ckpt", str(root / "hf"), "--dst", str(tmp_path / "exists"), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err

    big = jax.tree.map(lambda x: x, params)
    kernel = big["multi_modal_projector"]["linear_2"]["kernel"]
    big["multi_modal_projector"]["linear_2"]["kernel"] = kernel.at[0, 0].set(1e6)
    with pytest.raises(ExportError, match=r"multi_modal_projector\.linear_2\.weight: .*overflow float16"):
        export.export_llava(big, module.cfg, tmp_path / "overflow", dtype="float16", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["exists"]  # no output, no temp folder

    wrong = jax.tree.map(lambda x: x, params)
    del wrong["language_model"]["norm"]
    with pytest.raises(ExportError, match="missing parameters:\n  language_model/norm/scale"):
        export.export_llava(wrong, module.cfg, tmp_path / "wrong", progress=False)


def test_adapter_errors(tiny, tmp_path, capsys):
    root, _ = tiny
    module, params = hf_io.from_hf(root / "converted", lora=LORA, lora_key=jax.random.PRNGKey(10))
    lora_adapter.save_adapter(params, LORA, tmp_path / "a")  # no base recorded
    assert export_hf.main(["--ckpt", str(tmp_path / "a"), "--dst", str(tmp_path / "o"), "--quiet"]) == 1
    assert "pass --base" in capsys.readouterr().err

    meta = json.loads((tmp_path / "a" / lora_adapter.ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / lora_adapter.ADAPTER_CONFIG).write_text(json.dumps({**meta, "rank": 8}))
    with pytest.raises(ExportError, match=r"language_model/layers_0/mlp/down_proj/lora_a: shape \(64, 4\), "
                                                 r"expected \[in, 8\]"):
        lora_adapter.load_adapter(tmp_path / "a")

    # an adapter that does not fit the model: every mismatching tensor named
    bad = jax.tree.map(lambda x: x, params)
    bad["language_model"]["layers_1"]["mlp"]["up_proj"]["lora_a"] = jnp.zeros((7, 4))
    del bad["language_model"]["layers_0"]["self_attn"]["k_proj"]["lora_b"]
    lora_adapter.save_adapter(bad, LORA, tmp_path / "b")
    _, base = hf_io.from_hf(root / "converted")
    with pytest.raises(ExportError) as err:
        lora_adapter.apply_adapter(base, lora_adapter.load_adapter(tmp_path / "b"))
    msg = str(err.value)
    assert "language_model/layers_1/mlp/up_proj/lora_a: shape (7, 4), the model needs (32, 4)" in msg
    assert "language_model/layers_0/self_attn/k_proj: adapter lacks ['lora_b']" in msg
