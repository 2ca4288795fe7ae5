"""Our Flax BLIP-2 retrieval model (ITC scores, embeddings, ITM logits), converted from
transformers' Blip2ForImageTextRetrieval, against transformers' PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_tiny  # noqa: E402
from fisao_jax.models import hf_io  # noqa: E402
from fisao_jax.models.blip2 import Blip2RetrievalModel  # noqa: E402
from tools import convert_hf  # noqa: E402

CASES = {
    "freq2": dict(model=dict(cross_attention_frequency=2), images=2, qlens=(4, 6, 2)),
    "odd-freq1-3layers-image-token": dict(model=dict(odd=True, cross_attention_frequency=1, qformer_layers=3,
                                                     num_query_tokens=4, image_token_index=40),
                                          images=3, qlens=(5, 2, 7, 3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = hf_tiny.save_blip2_itm(root / "hf", **spec["model"])
    assert convert_hf.main(["--src", str(root / "hf"), "--dst", str(root / "converted")]) == 0
    module, params = hf_io.from_hf(root / "converted", expect="blip2_itm")
    size = module.cfg.vision.image_size
    pixels = np.random.RandomState(1).randn(spec["images"], 3, size, size).astype(np.float32)
    ids, mask = hf_tiny.qformer_inputs(spec["qlens"])
    return dict(model=model, root=root, module=module, params=params, pixels=pixels, ids=ids, mask=mask)


def _hf(case, ids, mask, itm: bool):
    """transformers' outputs; with image_token_index set its text input starts with the image tokens."""
    q = case["module"].cfg.num_query_tokens
    if case["model"].config.image_token_index is not None:
        ids = np.concatenate([np.full((len(ids), q), case["model"].config.image_token_index), ids], 1)
        mask = np.concatenate([np.ones((len(mask), q), mask.dtype), mask], 1)
    with torch.no_grad():
        return case["model"](pixel_values=torch.tensor(case["pixels"][:len(ids)] if itm else case["pixels"]),
                             input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             use_image_text_matching_head=itm)


def _apply(case, *args, method=None):
    m = case["module"]
    return np.asarray(m.apply({"params": case["params"]}, *map(jnp.asarray, args),
                              method=None if method is None else getattr(m, method)))


def test_itc_scores_and_embeddings_match_transformers(case):
    ref = _hf(case, case["ids"], case["mask"], itm=False)
    scores = _apply(case, case["pixels"], case["ids"], case["mask"])
    assert scores.shape == tuple(ref.logits_per_image.shape) == (len(case["pixels"]), len(case["ids"]))
    assert np.abs(scores - ref.logits_per_image.numpy()).max() <= 1e-5
    image = _apply(case, case["pixels"], method="encode_image")
    text = _apply(case, case["ids"], case["mask"], method="encode_text")
    assert image.shape == tuple(ref.image_embeds.shape)  # [B, Q, P]
    assert np.abs(image - ref.image_embeds.numpy()).max() <= 1e-5
    assert np.abs(text - ref.text_embeds.numpy()).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
    # scores spread: a broken image or text path would flatten them
    assert np.ptp(scores, axis=0).min() > 1e-3 and np.ptp(scores, axis=1).min() > 1e-3


def test_itm_logits_match_transformers(case):
    n = min(len(case["pixels"]), len(case["ids"]))
    ids, mask = case["ids"][:n], case["mask"][:n]
    ref = _hf(case, ids, mask, itm=True).logits_per_image.numpy()
    ours = _apply(case, case["pixels"][:n], ids, mask, method="match_logits")
    assert ours.shape == ref.shape == (n, 2)
    assert np.abs(ours - ref).max() <= 1e-5


def test_hf_folder_loads_directly_and_equals_converted(case):
    module, p_hf = hf_io.from_hf(case["root"] / "hf")
    assert isinstance(module, Blip2RetrievalModel) and module.cfg == case["module"].cfg
    hf_leaves = jax.tree_util.tree_leaves_with_path(p_hf)
    conv = dict(jax.tree_util.tree_leaves_with_path(case["params"]))
    assert len(hf_leaves) == len(conv) and "value_head" not in p_hf
    for path, v in hf_leaves:
        np.testing.assert_array_equal(np.asarray(v), np.asarray(conv[path]))
