"""Converter error cases: every offending key listed in one error, nothing half-written."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from safetensors.numpy import load_file, save_file  # noqa: E402

import hf_tiny  # noqa: E402
from fisao_jax.models import hf_io  # noqa: E402
from tools import convert_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    hf_tiny.save_llava(root, layers=1, vision_layers=2)
    return root


def _copy_with(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = dict(load_file(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_every_problem_listed_and_no_output(hf_llava, tmp_path):
    def edit(t):
        del t["language_model.model.norm.weight"]
        del t["multi_modal_projector.linear_2.bias"]
        t["language_model.model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        t["language_model.lm_head.weight"] = np.zeros((5, 32), np.float32)
    src = _copy_with(hf_llava, tmp_path / "bad", edit)
    dst = tmp_path / "out"
    with pytest.raises(hf_io.ConversionError) as err:
        hf_io.convert(src, dst)
    msg = str(err.value)
    for key in ("language_model.model.norm.weight", "multi_modal_projector.linear_2.bias",
                "language_model.model.layers.0.extra.weight", "language_model.lm_head.weight: checkpoint (5, 32)"):
        assert key in msg
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_wrong_model_type_names_the_file(hf_llava, tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(hf_io.ConversionError, match=r"config.json: unsupported model_type 'bert'"):
        hf_io.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_key_layout_is_accepted(hf_llava, tmp_path):
    """Hub files store `vision_tower.vision_model.*`; the result equals the plain layout's."""
    def edit(t):
        for k in [k for k in t if k.startswith("vision_tower.")]:
            t["vision_tower.vision_model." + k[len("vision_tower."):]] = t.pop(k)
        t["vision_tower.vision_model.embeddings.position_ids"] = np.arange(5)[None]  # HF buffer, ignored
    src = _copy_with(hf_llava, tmp_path / "hub", edit)
    kind, cfg = hf_io.read_hf_config(src)
    a = hf_io.hf_to_params(src, cfg)
    b = hf_io.hf_to_params(hf_llava, cfg)
    np.testing.assert_array_equal(a["vision_tower"]["embeddings"]["patch_embedding"]["kernel"],
                                  b["vision_tower"]["embeddings"]["patch_embedding"]["kernel"])


def test_both_layouts_at_once_is_an_error(hf_llava, tmp_path):
    def edit(t):
        t["vision_tower.vision_model.post_layernorm.bias"] = t["vision_tower.post_layernorm.bias"]
    src = _copy_with(hf_llava, tmp_path / "dup", edit)
    with pytest.raises(hf_io.ConversionError, match="given twice"):
        hf_io.convert(src, tmp_path / "out")


def test_existing_destination_is_not_replaced(hf_llava, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists"):
        hf_io.convert(hf_llava, dst)
    assert (dst / "keep.txt").read_text() == "user data"


def test_missing_weights_and_folder(tmp_path):
    src = tmp_path / "noweights"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {}, "vision_config": {}}))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors file"):
        hf_io.convert(src, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.from_hf(tmp_path / "nowhere")


def test_cli_reports_error_and_exit_code(hf_llava, tmp_path):
    def edit(t):
        del t["language_model.model.norm.weight"]
    src = _copy_with(hf_llava, tmp_path / "bad", edit)
    proc = subprocess.run([sys.executable, "tools/convert_hf.py", "--src", str(src), "--dst", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=hf_tiny.pathlib.Path(__file__).parents[1])
    assert proc.returncode == 1
    assert "missing tensors" in proc.stderr and "language_model.model.norm.weight" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_bfloat16_conversion_round_trips(hf_llava, tmp_path):
    import jax.numpy as jnp
    assert convert_hf.main(["--src", str(hf_llava), "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    _, params = hf_io.from_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    _, ref = hf_io.from_hf(hf_llava)
    k = params["language_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert k.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(k, np.float32),
                               np.asarray(ref["language_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]),
                               rtol=1e-2, atol=1e-3)


def test_pytorch_bin_checkpoint_converts_like_safetensors(hf_llava, tmp_path):
    import torch
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((hf_llava / "config.json").read_text())
    torch.save({k: torch.from_numpy(v.copy()) for k, v in load_file(hf_llava / "model.safetensors").items()},
               src / "pytorch_model.bin")
    kind, cfg = hf_io.read_hf_config(src)
    a, b = hf_io.hf_to_params(src, cfg), hf_io.hf_to_params(hf_llava, cfg)
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
