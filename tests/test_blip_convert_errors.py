"""BLIP-family conversion errors: bad checkpoints refused whole, naming every offending key;
unsupported architectures refused naming the file."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from safetensors.numpy import load_file, save_file  # noqa: E402

import hf_tiny  # noqa: E402
from fisao_jax.models import hf_io  # noqa: E402


@pytest.fixture(scope="module")
def hf_instructblip(tmp_path_factory):
    root = tmp_path_factory.mktemp("instructblip")
    hf_tiny.save_instructblip(root, layers=1)
    return root


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2")
    hf_tiny.save_blip2_itm(root)
    return root


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = dict(load_file(src / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_instructblip_every_problem_listed_and_no_output(hf_instructblip, tmp_path):
    def edit(t):
        del t["qformer.encoder.layer.0.crossattention.attention.key.weight"]
        del t["query_tokens"]
        t["qformer.encoder.layer.1.crossattention.output.dense.weight"] = np.zeros((24, 24), np.float32)
        t["vision_model.encoder.layers.0.self_attn.qkv.bias"] = np.zeros(32, np.float32)
        t["language_projection.weight"] = np.zeros((32, 25), np.float32)
    src = _copy_with(hf_instructblip, tmp_path / "bad", edit)
    with pytest.raises(hf_io.ConversionError) as err:
        hf_io.convert(src, tmp_path / "out")
    msg = str(err.value)
    assert "does not fit the instructblip model" in msg
    for key in ("missing tensors", "qformer.encoder.layer.0.crossattention.attention.key.weight", "query_tokens",
                "unexpected tensors", "qformer.encoder.layer.1.crossattention.output.dense.weight",
                "vision_model.encoder.layers.0.self_attn.qkv.bias: checkpoint (32,) vs model (96,)",
                "language_projection.weight: checkpoint (32, 25)"):
        assert key in msg, key
    assert not (tmp_path / "out").exists()
    with pytest.raises(hf_io.ConversionError, match="query_tokens"):
        hf_io.from_hf(src)


def test_blip2_every_problem_listed(hf_blip2, tmp_path):
    def edit(t):
        del t["itm_head.bias"]
        t["embeddings.LayerNorm.weight"] = np.ones(24, np.float32)
        t["vision_model.embeddings.position_embedding"] = np.zeros((1, 4, 32), np.float32)
    src = _copy_with(hf_blip2, tmp_path / "bad", edit)
    with pytest.raises(hf_io.ConversionError) as err:
        hf_io.convert(src, tmp_path / "out")
    msg = str(err.value)
    for key in ("itm_head.bias", "embeddings.LayerNorm.weight",
                "vision_model.embeddings.position_embedding: checkpoint (1, 4, 32) vs model (1, 5, 32)"):
        assert key in msg, key
    assert not (tmp_path / "out").exists()


def test_other_blip2_architectures_are_refused(hf_blip2, tmp_path):
    def gen(c):
        c["architectures"] = ["Blip2ForConditionalGeneration"]
    src = _copy_with(hf_blip2, tmp_path / "gen", edit_config=gen)
    with pytest.raises(hf_io.ConversionError,
                       match=r"config.json: BLIP-2 architecture \['Blip2ForConditionalGeneration'\] is not supported "
                             r"\(only Blip2ForImageTextRetrieval"):
        hf_io.convert(src, tmp_path / "out")


def test_unsupported_instructblip_configs_name_the_file(hf_instructblip, tmp_path):
    def t5(c):
        c["text_config"] = {"model_type": "t5"}
    def no_image_token(c):
        del c["image_token_index"]
    for name, edit, message in (("t5", t5, "unsupported InstructBLIP text model 't5'"),
                                ("noimg", no_image_token, "no image_token_index")):
        src = _copy_with(hf_instructblip, tmp_path / name, edit_config=edit)
        with pytest.raises(hf_io.ConversionError, match=message) as err:
            hf_io.convert(src, tmp_path / "out")
        assert str(src / "config.json") in str(err.value)


def test_expect_refuses_another_kind(hf_instructblip, hf_blip2):
    with pytest.raises(hf_io.ConversionError, match="holds a instructblip model, expected llava"):
        hf_io.from_hf(hf_instructblip, expect="llava")
    with pytest.raises(hf_io.ConversionError, match="holds a blip2_itm model, expected instructblip"):
        hf_io.from_hf(hf_blip2, expect="instructblip")
