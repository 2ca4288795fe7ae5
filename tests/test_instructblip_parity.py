"""Our Flax InstructBLIP, converted from transformers checkpoints, against transformers' PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_tiny  # noqa: E402
from fisao_jax.models import configs as C  # noqa: E402
from fisao_jax.models import hf_io  # noqa: E402
from fisao_jax.models.instructblip import InstructBlipModel  # noqa: E402
from tools import convert_hf  # noqa: E402

CASES = {
    "gqa-freq2-2rows": dict(model=dict(gqa=True, cross_attention_frequency=2), images=(1, 1), pads=(3, 0),
                            qlens=(4, 6)),
    "mha-odd-freq1-3images": dict(model=dict(gqa=False, odd=True, cross_attention_frequency=1, qformer_layers=3),
                                  images=(2, 1), pads=(0, 5), qlens=(5, 2, 6)),
    "gqa-odd-freq2-3qlayers": dict(model=dict(gqa=True, odd=True, cross_attention_frequency=2, qformer_layers=3,
                                              num_query_tokens=4), images=(1, 2), pads=(2, 0), qlens=(3, 3, 7)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = hf_tiny.save_instructblip(root / "hf", **spec["model"])
    assert convert_hf.main(["--src", str(root / "hf"), "--dst", str(root / "converted")]) == 0
    module, params = hf_io.from_hf(root / "converted")
    cfg = module.cfg
    ids, mask, pixels, pos = hf_tiny.llava_inputs(cfg.num_image_tokens, spec["images"], spec["pads"],
                                                  image_size=cfg.vision.image_size)
    qids, qmask = hf_tiny.qformer_inputs(spec["qlens"])
    return dict(model=model, root=root, module=module, params=params, ids=ids, mask=mask, pixels=pixels, pos=pos,
                qids=qids, qmask=qmask)


def _reference(c, **override):
    inputs = dict(input_ids=c["ids"], attention_mask=c["mask"], pixel_values=c["pixels"], qformer_input_ids=c["qids"],
                  qformer_attention_mask=c["qmask"], position_ids=c["pos"])
    inputs.update(override)
    with torch.no_grad():
        return c["model"](**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


def _ours(c, params=None, **override):
    inputs = dict(input_ids=c["ids"], attention_mask=c["mask"], pixel_values=c["pixels"], qformer_input_ids=c["qids"],
                  qformer_attention_mask=c["qmask"])
    inputs.update(override)
    return np.asarray(c["module"].apply({"params": c["params"] if params is None else params},
                                        **{k: jnp.asarray(v) for k, v in inputs.items()}))


def test_logits_match_transformers(case):
    ref, ours = _reference(case), _ours(case)
    valid = case["mask"].astype(bool)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref)[valid].max()
    assert err <= 1e-4, err
    assert np.abs(ref[valid]).max() > 0.05  # not a comparison of near-zero tensors


def test_image_and_instruction_reach_the_logits(case):
    """The comparison above would not notice a broken image path if the image did not matter."""
    base = _ours(case)
    valid = case["mask"].astype(bool)
    other_pixels = _ours(case, pixel_values=case["pixels"][::-1].copy())
    qids = case["qids"].copy()
    qids[:, 1] = (qids[:, 1] + 1) % hf_tiny.QFORMER_VOCAB
    other_instruction = _ours(case, qformer_input_ids=qids)
    assert np.abs(other_pixels - base)[valid].max() > 1e-3
    assert np.abs(other_instruction - base)[valid].max() > 1e-3
    np.testing.assert_allclose(other_instruction, _reference(case, qformer_input_ids=qids), atol=1e-4)


def test_hf_folder_loads_directly_and_equals_converted(case):
    module, p_hf = hf_io.from_hf(case["root"] / "hf", expect="instructblip")
    assert isinstance(module, InstructBlipModel) and module.cfg == case["module"].cfg
    hf_leaves = jax.tree_util.tree_leaves_with_path(p_hf)
    conv = dict(jax.tree_util.tree_leaves_with_path(case["params"]))
    assert len(hf_leaves) == len(conv)
    for path, v in hf_leaves:
        np.testing.assert_array_equal(np.asarray(v), np.asarray(conv[path]))
    assert not np.asarray(p_hf["value_head"]["kernel"]).any()


def test_padding_between_image_tokens_and_text_as_the_processor_writes_it(case):
    """transformers' processor pads the instruction and then prepends the image tokens; with
    position ids cumsum(mask) - 1 that layout gives the logits of the fully left-padded one."""
    q = case["module"].cfg.num_image_tokens
    rng = np.random.RandomState(3)
    texts = [list(rng.randint(3, hf_tiny.IMAGE_TOKEN, size=n)) for n in (6, 2)]
    t = q + max(len(x) for x in texts)
    mid_ids, mid_mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
    left_ids, left_mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
    for r, x in enumerate(texts):
        row = [hf_tiny.IMAGE_TOKEN] * q + x
        mid_ids[r, :q], mid_mask[r, :q] = hf_tiny.IMAGE_TOKEN, 1
        mid_ids[r, t - len(x):], mid_mask[r, t - len(x):] = x, 1
        left_ids[r, t - len(row):], left_mask[r, t - len(row):] = row, 1
    sub = dict(pixel_values=case["pixels"][:2], qformer_input_ids=case["qids"][:2],
               qformer_attention_mask=case["qmask"][:2])
    pos = np.maximum(mid_mask.cumsum(-1) - 1, 0)
    ref = _reference(case, input_ids=mid_ids, attention_mask=mid_mask, position_ids=pos, **sub)
    mid = _ours(case, input_ids=mid_ids, attention_mask=mid_mask, **sub)
    left = _ours(case, input_ids=left_ids, attention_mask=left_mask, **sub)
    assert np.abs(mid - ref)[mid_mask.astype(bool)].max() <= 1e-4
    assert np.abs(left[left_mask.astype(bool)] - ref[mid_mask.astype(bool)]).max() <= 1e-4


def test_lora_goes_on_the_language_model_only(case):
    module, params = hf_io.from_hf(case["root"] / "converted", lora=C.LoRAConfig(rank=4),
                                   lora_key=jax.random.PRNGKey(1))
    owners = {tuple(str(getattr(k, "key", k)) for k in path[:-1])
              for path, _ in jax.tree_util.tree_leaves_with_path(params) if str(path[-1].key) == "lora_a"}
    assert owners and all(o[0] == "language_model" and o[1].startswith("layers_") for o in owners)
    assert len(owners) == 7 * module.cfg.text.num_hidden_layers
    ids, mask = jnp.asarray(case["ids"]), jnp.asarray(case["mask"])
    kw = dict(pixel_values=jnp.asarray(case["pixels"]), qformer_input_ids=jnp.asarray(case["qids"]),
              qformer_attention_mask=jnp.asarray(case["qmask"]))
    with_lora = module.apply({"params": params}, ids, attention_mask=mask, use_lora=True, **kw)
    np.testing.assert_allclose(np.asarray(with_lora), _ours(case), atol=1e-6)  # fresh adapters: B = 0
