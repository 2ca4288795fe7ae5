"""Our Flax LLaVA / CLIP, converted from transformers checkpoints, against transformers' PyTorch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

import hf_tiny  # noqa: E402
from fisao_jax.models import hf_io
from tools import convert_hf  # noqa: E402

LLAVA_CASES = {
    "mha-layer-2-default-2rows": dict(gqa=False, feature_layer=-2, strategy="default", images=(1, 1), pads=(3, 0)),
    "gqa-layer-1-full-2rows": dict(gqa=True, feature_layer=-1, strategy="full", images=(1, 1), pads=(0, 4)),
    "gqa-layer-2-default-3images": dict(gqa=True, feature_layer=-2, strategy="default", images=(2, 1), pads=(0, 6)),
    "gqa-layers-list-full": dict(gqa=True, feature_layer=[-3, -1], strategy="full", images=(1, 1), pads=(1, 0)),
}


@pytest.fixture(scope="module", params=sorted(LLAVA_CASES))
def llava_case(request, tmp_path_factory):
    case = LLAVA_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = hf_tiny.save_llava(root / "hf", gqa=case["gqa"], feature_layer=case["feature_layer"],
                               strategy=case["strategy"])
    assert convert_hf.main(["--src", str(root / "hf"), "--dst", str(root / "converted")]) == 0
    return case, model, root


def test_llava_logits_match_transformers(llava_case):
    case, model, root = llava_case
    module, params = hf_io.from_hf(root / "converted")
    n_tok = module.cfg.num_image_tokens
    ids, mask, pixels, pos = hf_tiny.llava_inputs(n_tok, case["images"], case["pads"])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                    attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)[valid].max()
    assert err <= 1e-4, err
    assert np.abs(ref[valid]).max() > 0.05  # the comparison is not between near-zero tensors


def test_hf_folder_loads_directly_and_equals_converted(llava_case):
    _, _, root = llava_case
    _, p_hf = hf_io.from_hf(root / "hf")
    _, p_conv = hf_io.from_hf(root / "converted")
    import jax
    leaves = jax.tree_util.tree_leaves_with_path(p_hf)
    conv = dict(jax.tree_util.tree_leaves_with_path(p_conv))
    assert len(leaves) == len(conv)
    for path, v in leaves:
        np.testing.assert_array_equal(np.asarray(v), np.asarray(conv[path]))


@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_clip_embeddings_match_transformers(tmp_path, eos_token_id):
    model = hf_tiny.save_clip(tmp_path / "hf", eos_token_id=eos_token_id)
    assert convert_hf.main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "conv")]) == 0
    module, params = hf_io.from_hf(tmp_path / "conv")
    rng = np.random.RandomState(1)
    pixels = rng.randn(3, 3, 28, 28).astype(np.float32)
    # right-padded texts with EOS (7) inside, id 2 legacy: pooled at the max id
    ids = np.array([[1, 5, 9, 7, 0, 0], [1, 12, 44, 31, 8, 7], [1, 7, 0, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    mask[:, 0] = 1
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.tensor(pixels))
        ref_txt = model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
    img = np.asarray(module.apply({"params": params}, jnp.asarray(pixels), method=module.encode_image))
    txt = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method=module.encode_text))
    assert np.abs(img - ref_img).max() <= 1e-5
    assert np.abs(txt - ref_txt).max() <= 1e-5
    assert np.abs(ref_txt).max() > 0.05 and np.abs(ref_img).max() > 0.05
