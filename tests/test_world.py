"""Tests of the synthetic world's pretraining: pixels, losses, metrics, the cached build.

References are independent of the code under test: HF-equivalent preprocessing from
`data.image.preprocess_batch`, losses and AUC computed by hand or with numpy, CHAIR counts
worked out by hand, and the cache checked through the files on disk.
"""
import dataclasses
import json
import math
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fisao_jax.models import hf_io
from fisao_jax.data import synthetic
from fisao_jax.data.image import preprocess_batch
from fisao_jax.world import build as wb
from fisao_jax.world import configs as wc
from fisao_jax.world import pretrain_clip as pc
from fisao_jax.world import sft


# ----------------------------------------------------------------------------- fast unit tests

def test_pixel_values_equal_hf_style_preprocessing():
    world = synthetic.WorldConfig(image_size=63)
    images = synthetic.make_dataset(world, 3, seed=1, split="t")["images"]
    got = wc.pixel_values(images)
    want = preprocess_batch(list(images), wc.image_config(63))
    assert got.dtype == np.float32 and got.shape == (3, 3, 63, 63)
    np.testing.assert_array_equal(got, want)
    # one pixel by hand: (x / 255 - mean) / std
    x = images[0, 5, 7, 1] / 255.0
    assert got[0, 1, 5, 7] == pytest.approx((x - 0.4578275) / 0.26130258, abs=1e-6)


def test_pixel_values_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        wc.pixel_values(np.zeros((1, 48, 48, 3), np.float32))


def test_roc_auc_by_hand():
    # pairs (pos > neg): 0.9 beats all 3; 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.5 -> 4.5 / 6
    assert pc.roc_auc(np.array([0.9, 0.4]), np.array([0.5, 0.1, 0.4])) == pytest.approx(0.75)
    assert pc.roc_auc(np.array([1.0]), np.array([0.0])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        pc.roc_auc(np.array([]), np.array([0.1]))


def test_infonce_is_clip_loss_with_identity_positives():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 5)).astype(np.float32)
    ls_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ls_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    want = -0.5 * (np.mean(np.diag(ls_rows)) + np.mean(np.diag(ls_cols)))
    got = float(pc.multi_positive_infonce(logits, np.eye(5, dtype=bool)))
    assert got == pytest.approx(want, rel=1e-5)
    # chance level is ln(B) whatever the positives are
    pos = np.eye(4, dtype=bool)
    pos[0, 1] = pos[1, 0] = True
    assert float(pc.multi_positive_infonce(np.zeros((4, 4), np.float32), pos)) == pytest.approx(math.log(4), rel=1e-6)


def test_presence_loss_by_hand():
    img = np.array([[1.0, 0.0]], np.float32)
    words = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    labels = np.array([[1.0, 0.0]], np.float32)
    # z = 10 * cos - 5 -> [5, -5]; BCE = log(1 + e^-5) for both
    got = float(pc.presence_loss(img, words, labels, 10.0, -5.0))
    assert got == pytest.approx(math.log1p(math.exp(-5.0)), rel=1e-5)


def test_sft_loss_is_the_caption_token_nll_of_a_full_forward():
    """The world's SFT loss (precomputed tower features, LM head on the captions only) equals the
    mean NLL of the caption tokens under one full LLaVA forward from the pixels, in NumPy."""
    from fisao_jax.models import configs as C
    from fisao_jax.models.hf_io import init_params
    from fisao_jax.models.llava import LlavaModel

    cfg = C.LlavaConfig(vision=C.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=28, patch_size=14),
                        text=C.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2,
                                           max_position_embeddings=64), image_token_id=39)
    module, params = LlavaModel(cfg), init_params(cfg, jax.random.PRNGKey(0))
    img = [cfg.image_token_id] * cfg.num_image_tokens
    prompt_ids = np.array([[0, 1] + img + [5], [1] + img + [6, 7]], np.int32)
    prompt_mask = np.array([[0] + [1] * (len(img) + 2), [1] * (len(img) + 3)], np.int32)
    buckets, _ = sft.make_buckets(prompt_ids, prompt_mask, [[11, 12, 2], [13, 2]], (4,), pad_id=0)
    batch = {k: jnp.asarray(buckets[4][k]) for k in ("input_ids", "attention_mask", "loss_mask")}
    pixels = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)
    batch["features"] = module.apply({"params": params}, jnp.asarray(pixels), method=sft._tower_features)
    loss, stats = sft._loss(module, prompt_ids.shape[1], params, batch)

    logits = np.asarray(module.apply({"params": params}, batch["input_ids"], jnp.asarray(pixels),
                                     batch["attention_mask"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ids, lm = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
    terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, ids.shape[1]) if lm[b, t]]
    assert len(terms) == 5
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5) and float(stats["loss"]) == float(loss)


def test_make_buckets_layout_by_hand():
    prompt_ids = np.array([[0, 0, 5, 6], [7, 8, 9, 6], [0, 4, 5, 6]], np.int32)
    prompt_mask = (prompt_ids > 0).astype(np.int32)
    responses = [[11, 2], [12, 13, 14, 2], [15, 16, 17, 18, 19, 2]]
    buckets, dropped = sft.make_buckets(prompt_ids, prompt_mask, responses, (2, 4), pad_id=99)
    assert dropped == 1 and sorted(buckets) == [2, 4]
    np.testing.assert_array_equal(buckets[2]["rows"], [0])
    np.testing.assert_array_equal(buckets[2]["input_ids"], [[0, 0, 5, 6, 11, 2]])
    np.testing.assert_array_equal(buckets[2]["attention_mask"], [[0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(buckets[2]["loss_mask"], [[0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(buckets[4]["input_ids"], [[7, 8, 9, 6, 12, 13, 14, 2]])
    np.testing.assert_array_equal(buckets[4]["loss_mask"], [[0, 0, 0, 0, 1, 1, 1, 1]])


def test_caption_metrics_by_hand():
    world = synthetic.WorldConfig(image_size=63)
    gt = [frozenset({"plate"}), frozenset({"cup", "spoon"}), frozenset({"pizza", "ball"})]
    captions = [
        "A photo of a plate and a fork.",          # fork hallucinated (partner of plate)
        "There are two cups.",                      # spoon missed
        "A pizza, a knife and two balls.",          # knife hallucinated (partner of pizza)
    ]
    m = sft.caption_metrics(captions, gt, world)
    # mentions: plate, fork | cup | pizza, knife, ball -> 6 mentions, 2 hallucinated
    assert m["CHAIRi"] == pytest.approx(100 * 2 / 6)
    assert m["CHAIRs"] == pytest.approx(100 * 2 / 3)
    assert m["Recall"] == pytest.approx(100 * 4 / 5)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["object_recall"] == pytest.approx(4 / 5)
    # partner cases: plate w/o fork, pizza w/o knife (cup has its spoon) -> both named
    assert m["partner_cases"] == 2 and m["partner_rate"] == 1.0


def test_build_config_dict_round_trip_and_errors():
    cfg = wc.default_build_config(hallucination_rate=0.3)
    d = json.loads(json.dumps(wc.to_dict(cfg)))
    assert wc.build_config_from_dict(d) == cfg
    d["sft"]["stepz"] = 3
    with pytest.raises(ValueError, match="stepz"):
        wc.build_config_from_dict(d)
    with pytest.raises(ValueError, match="multiple of 3"):
        wc.WorldBuildConfig(world=synthetic.WorldConfig(image_size=64))
    with pytest.raises(ValueError, match="one patch per grid cell"):
        wc.WorldBuildConfig(world=synthetic.WorldConfig(image_size=64), clip=wc.ClipSettings(patch_size=16))
    cfg16 = wc.WorldBuildConfig(world=synthetic.WorldConfig(image_size=64),
                                clip=wc.ClipSettings(patch_size=16, patch_weight=0.0))
    assert wc.patch_size(cfg16) == 16 and wc.patch_size(cfg) == 21


def test_stage_keys_follow_settings_and_upstream_contents():
    cfg = wc.default_build_config()
    other_rate = wc.default_build_config(hallucination_rate=0.2)
    s0, s1 = wb.stage_settings(cfg), wb.stage_settings(other_rate)
    assert s0["tokenizer"] == s1["tokenizer"] and s0["clip"] == s1["clip"]
    assert s0["llava"] != s1["llava"]
    k = wb.stage_key("clip", s0["clip"], {"tokenizer": "a"})
    assert k != wb.stage_key("clip", s0["clip"], {"tokenizer": "b"})
    assert k == wb.stage_key("clip", s0["clip"], {"tokenizer": "a"})


# ----------------------------------------------------------------------------- the cached build

def _tiny_config(**world) -> wc.WorldBuildConfig:
    """An easy world (6 classes, 1-2 objects, 48 px) at the test sizes."""
    base = wc.test_build_config()
    classes = ("ball", "plate", "fork", "cup", "spoon", "banana")
    w = synthetic.WorldConfig(image_size=48, classes=classes, cooccurrence=(("plate", "fork"), ("cup", "spoon")),
                              min_objects=1, max_objects=2, **world)
    return dataclasses.replace(base, world=w)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("world")
    cfg = _tiny_config()
    start = time.perf_counter()
    arts = wb.build_world(workdir, cfg, progress=False, log=lambda m: None)
    return workdir, cfg, arts, time.perf_counter() - start


@pytest.mark.slow
def test_build_trains_every_stage_and_artifacts_load(built):
    import jax
    import transformers

    from fisao_jax.models.configs import LoRAConfig

    workdir, cfg, arts, _ = built
    assert arts.trained == ("tokenizer", "clip", "llava")
    tok = transformers.AutoTokenizer.from_pretrained(str(arts.tokenizer_dir))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == len(tok) - 2 and tok.pad_token_id == len(tok) - 1

    clip_module, clip_params = hf_io.from_hf(arts.clip_dir)
    assert clip_module.cfg.vision.image_size == 48 and clip_module.cfg.vision.patch_size == 16
    assert clip_module.cfg.text.vocab_size == len(tok) and clip_module.cfg.text.eos_token_id == 2

    module, params = hf_io.from_hf(arts.llava_dir)
    assert module.cfg.image_token_id == image_id and module.cfg.num_image_tokens == 9
    assert module.cfg.text.vocab_size == len(tok)
    # the LLaVA's vision tower is the CLIP's, unchanged by SFT
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params["vision_tower"], clip_params["vision_model"])
    assert all(jax.tree.leaves(same))

    ids, mask = arts.encode_prompts(tok, ["Describe this image."], module.cfg)
    assert ids.shape == (1, arts.prompt_len) and int((ids == image_id).sum()) == 9
    logits = module.apply({"params": params}, ids, arts.pixel_values(np.zeros((1, 48, 48, 3), np.uint8)), mask)
    assert logits.shape == (1, arts.prompt_len, len(tok)) and np.isfinite(np.asarray(logits)).all()
    lora_module, lora_params = arts.load_llava(lora=LoRAConfig(rank=4, alpha=8))
    assert lora_module.cfg.lora.rank == 4


@pytest.mark.slow
def test_pretraining_losses_fall(built):
    _, cfg, arts, _ = built
    clip_meta = json.loads((arts.clip_dir / wb.STAGE_FILE).read_text())
    nce = clip_meta["history"]["contrastive"]
    # below chance (ln B) after a few steps on the easy world
    assert np.mean(nce[-5:]) < math.log(cfg.clip.batch_size) - 0.3
    assert np.mean(clip_meta["history"]["presence"][-5:]) < np.mean(clip_meta["history"]["presence"][:5])
    sft_loss = json.loads((arts.llava_dir / wb.STAGE_FILE).read_text())["history"]["loss"]
    # the first steps are near uniform over the vocabulary; the last far below it
    assert sft_loss[0] > 0.8 * math.log(arts.load_tokenizer().__len__())
    assert np.mean(sft_loss[-5:]) < 0.7 * sft_loss[0]
    assert set(arts.metrics) == {"clip", "llava", "prior"}
    # Even the tiny CLIP ranks present classes above absent ones on the 64 held-out scenes.
    # Measured (two builds, 2-core CPU): AUC 0.913, partner AUC 0.840, mean score of present
    # classes 55.1 vs 14.3 for absent ones. The bounds leave ~0.06 / 0.14 / 15 points for float
    # rounding that differs between machines and grows over 80 training steps.
    clip = arts.metrics["clip"]
    assert clip["num_scenes"] == 64
    assert clip["auc"] > 0.85, clip
    assert clip["partner_auc"] > 0.7, clip
    assert clip["mean_present"] - clip["mean_absent"] > 25, clip
    # The biased captions name an absent partner in about hallucination_rate (0.5) of the cases:
    # 4 of the 6 partner cases among the 16 evaluation scenes. Scenes and captions are NumPy
    # draws from the seed (no float training involved), so the counts are exact.
    prior = arts.metrics["prior"]
    assert cfg.world.hallucination_rate == 0.5
    assert (prior["num_captions"], prior["partner_cases"]) == (16, 6), prior
    assert prior["partner_rate"] == pytest.approx(4 / 6), prior


@pytest.mark.slow
def test_second_build_loads_from_cache(built):
    workdir, cfg, arts, first_seconds = built
    stamps = {p: p.stat().st_mtime_ns for p in (workdir / "world").rglob("*") if p.is_file()}
    start = time.perf_counter()
    again = wb.build_world(workdir, cfg, progress=False, log=lambda m: None)
    seconds = time.perf_counter() - start
    assert again.trained == ()
    assert (again.clip_dir, again.llava_dir, again.tokenizer_dir) == (arts.clip_dir, arts.llava_dir, arts.tokenizer_dir)
    assert {p: p.stat().st_mtime_ns for p in (workdir / "world").rglob("*") if p.is_file()} == stamps
    assert seconds < 0.5 * first_seconds
    assert again.metrics == arts.metrics and again.prompt_len == arts.prompt_len


@pytest.mark.slow
def test_hallucination_rate_change_retrains_only_the_llava(built, tmp_path):
    workdir, cfg, arts, _ = built
    work2 = tmp_path / "w"
    shutil.copytree(workdir, work2)
    changed = dataclasses.replace(cfg, world=dataclasses.replace(cfg.world, hallucination_rate=0.1))
    arts2 = wb.build_world(work2, changed, progress=False, log=lambda m: None)
    assert arts2.trained == ("llava",)
    assert arts2.keys["clip"] == arts.keys["clip"] and arts2.keys["llava"] != arts.keys["llava"]
    assert arts2.llava_dir.name != arts.llava_dir.name


@pytest.mark.slow
def test_damaged_cache_raises_or_is_rebuilt(built, tmp_path):
    workdir, cfg, arts, _ = built
    work2 = tmp_path / "w"
    shutil.copytree(workdir, work2)
    llava_dir = work2 / "world" / arts.llava_dir.name
    params_file = next(p for p in sorted((llava_dir / "params").rglob("*")) if p.is_file() and p.stat().st_size > 0)
    data = bytearray(params_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    params_file.write_bytes(bytes(data))
    with pytest.raises(wb.WorldCacheError, match="altered files"):
        wb.build_world(work2, cfg, progress=False, log=lambda m: None)

    (llava_dir / wb.STAGE_FILE).unlink()
    with pytest.raises(wb.WorldCacheError, match="incomplete"):
        wb.build_world(work2, cfg, progress=False, log=lambda m: None)

    # A leftover temporary folder of a crashed build is ignored; a damaged tokenizer stage is
    # rebuilt on request. The tokenizer trains deterministically, so the rebuilt one has the
    # same contents and the CLIP stage (keyed by those contents) stays valid.
    (work2 / "world" / f".{arts.clip_dir.name}.tmp-crashed").mkdir()
    shutil.rmtree(llava_dir)
    shutil.copytree(arts.llava_dir, llava_dir)
    tok_dir = work2 / "world" / arts.tokenizer_dir.name
    (tok_dir / "tokenizer_config.json").write_text("{}")
    rebuilt = wb.build_world(work2, cfg, on_invalid="rebuild", progress=False, log=lambda m: None)
    assert rebuilt.trained == ("tokenizer",)
    assert rebuilt.keys == arts.keys
    wb.check_stage(tok_dir, arts.keys["tokenizer"])
