"""COCO folder reader, seeded subsets and CHAIR ground truth on small fixture folders."""
import gzip
import json
import sys
import types

import numpy as np
import PIL.Image
import pytest

from fisao_jax import packaged
from fisao_jax.data import coco

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
              {"id": 63, "name": "couch"}, {"id": 65, "name": "bed"}]


def write_coco(root, split, images, instances, captions, categories=CATEGORIES, make_files=True):
    """A COCO-layout folder; images: {image_id: file_name}."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    entries = [{"id": i, "file_name": name, "height": 6, "width": 8} for i, name in images.items()]
    anns = [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(instances)]
    caps = [{"id": k, "image_id": i, "caption": t} for k, (i, t) in enumerate(captions)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": entries, "annotations": caps}))
    if make_files:
        for i, name in images.items():
            PIL.Image.new("RGB", (8, 6), (i % 256, 40, 90)).save(root / split / name)


def coco_name(split, image_id):
    return f"COCO_{split}_{image_id:012d}.jpg"


@pytest.fixture()
def vocab():
    from fisao_jax.eval import chair
    return chair.coco_vocab()


@pytest.fixture()
def small(tmp_path):
    root = tmp_path / "coco"
    images = {i: coco_name("val2014", i) for i in (1, 2, 3, 5, 8, 13, 21, 34)}
    instances = [(1, 18), (2, 17), (2, 17), (3, 1)]
    captions = [(1, "A puppy sleeps next to a man on a couch."), (2, "Two kittens on a bed."),
                (3, "A woman holding an umbrella.")] + [(i, "Something.") for i in (5, 8, 13, 21, 34)]
    write_coco(root, "val2014", images, instances, captions)
    return root


def test_ground_truth_by_chair_rules_by_hand(small, vocab):
    records, report = coco.evaluation_set(small, n=8, seed=0, vocab=vocab, progress=False)
    objects = {r.image_id: set(r.objects) for r in records}
    # Instance categories + node words of caption mentions (puppy -> dog, man/woman -> person, kitten -> cat).
    assert objects[1] == {"dog", "person", "couch"}
    assert objects[2] == {"cat", "bed"}
    assert objects[3] == {"person", "umbrella"}
    assert objects[5] == set()
    assert [r.image_id for r in records] == [1, 2, 3, 5, 8, 13, 21, 34]
    assert records[0].captions == ("A puppy sleeps next to a man on a couch.",)
    assert records[0].image_path == str(small / "val2014" / "COCO_val2014_000000000001.jpg")
    assert report.kept == 8 and report.examined == 8


def test_seeded_subset_is_the_first_n_of_the_seeded_permutation(small, vocab):
    ids = [1, 2, 3, 5, 8, 13, 21, 34]
    for seed in (0, 1, 7):
        order = np.random.default_rng(seed).permutation(len(ids))
        expected = sorted(ids[i] for i in order[:3])
        records, _ = coco.evaluation_set(small, n=3, seed=seed, vocab=vocab, progress=False)
        assert [r.image_id for r in records] == expected
    again, _ = coco.evaluation_set(small, n=3, seed=7, vocab=vocab, progress=False)
    assert [r.image_id for r in again] == expected


def test_missing_image_raises_by_default_and_skip_walks_on(small, vocab):
    order = np.random.default_rng(0).permutation(8)
    ids = [1, 2, 3, 5, 8, 13, 21, 34]
    gone = ids[order[1]]
    (small / "val2014" / coco_name("val2014", gone)).unlink()
    missing = f"image_id {gone}: image file not found: .*{coco_name('val2014', gone)}"
    with pytest.raises(FileNotFoundError, match=missing):
        coco.evaluation_set(small, n=3, vocab=vocab, progress=False)
    records, report = coco.evaluation_set(small, n=3, on_error="skip", vocab=vocab, progress=False)
    assert [r.image_id for r in records] == sorted(ids[i] for i in (order[0], order[2], order[3]))
    assert report.skipped["missing_image"] == 1 and report.examined == 4
    assert "missing_image: 1" in report.summary()
    with pytest.raises(ValueError, match="only 7 usable images of 8, 8 requested"):
        coco.evaluation_set(small, n=8, on_error="skip", vocab=vocab, progress=False)
    broken = small / "val2014" / coco_name("val2014", ids[order[0]])
    broken.write_text("not an image")
    with pytest.raises(ValueError, match=f"image_id {ids[order[0]]}: .*cannot read"):
        coco.evaluation_set(small, n=2, check_images="open", vocab=vocab, progress=False)


def test_precomputed_ground_truth_json(small, tmp_path):
    gt_file = tmp_path / "gt.json.gz"
    with gzip.open(gt_file, "wt") as f:
        json.dump({str(i): ["dog", "frisbee"] for i in (1, 2, 3, 5, 8, 13, 21)}, f)
    with pytest.raises(ValueError, match="image_id 34 is not in .*gt.json.gz"):
        coco.calibration_set(small, n=8, split="val2014", ground_truth=gt_file, progress=False)
    records, report = coco.calibration_set(small, n=7, split="val2014", ground_truth=gt_file, on_error="skip",
                                           with_captions=False, progress=False)
    assert [r.image_id for r in records] == [1, 2, 3, 5, 8, 13, 21]
    assert all(r.objects == {"dog", "frisbee"} and r.captions == () for r in records)
    # Image 34 (index 7) is examined, and skipped, unless it comes last in the seeded order.
    last = int(np.random.default_rng(0).permutation(8)[-1])
    assert report.skipped["no_ground_truth"] == (0 if last == 7 else 1)
    bad = tmp_path / "bad_gt.json"
    bad.write_text(json.dumps({"x1": ["dog"]}))
    with pytest.raises(ValueError, match="bad_gt.json: key 'x1' is not an integer"):
        coco.load_ground_truth_json(bad)


def test_bad_annotation_files_name_the_file(small, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_train2014.json"):
        coco.calibration_set(small, n=2, progress=False)
    (small / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"captions_val2014.json"):
        coco.evaluation_set(small, n=2, progress=False)
    instances = small / "annotations" / "instances_val2014.json"
    instances.write_text('{"images": [],\n  "annotations": [}')
    with pytest.raises(ValueError, match=r"instances_val2014.json: invalid JSON at line 2 column"):
        coco.load_coco_split(small, "val2014", with_captions=False)
    instances.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"instances_val2014.json: missing list 'annotations'"):
        coco.load_coco_split(small, "val2014", with_captions=False)
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": CATEGORIES,
                                     "annotations": [{"id": 9, "image_id": 2, "category_id": 1}]}))
    with pytest.raises(ValueError, match=r"instances_val2014.json: annotations\[0\] refers to image_id 2"):
        coco.load_coco_split(small, "val2014", with_captions=False)
    instances.write_text(json.dumps({"images": [{"id": 1}], "categories": CATEGORIES, "annotations": []}))
    with pytest.raises(ValueError, match=r"instances_val2014.json: images\[0\] needs keys \['id', 'file_name'\]"):
        coco.load_coco_split(small, "val2014", with_captions=False)
    instances.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": CATEGORIES,
                                     "annotations": [{"id": 9, "image_id": 1, "category_id": 99}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] has unknown category_id 99"):
        coco.load_coco_split(small, "val2014", with_captions=False)


def test_chair_ground_truth_matches_reference_fixture(test_data, tmp_path, vocab):
    """80 val2014 images of LLaVA's CHAIR fixture: our folder pipeline gives the published objects."""
    fixture = json.loads((test_data / "chair" / "chair_gt_construction_fixture_coco80.json").read_text())["images"]
    names = json.loads(packaged.path(packaged.COCO_CATEGORIES).read_text())
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images = {im["image_id"]: coco_name("val2014", im["image_id"]) for im in fixture}
    instances = [(im["image_id"], cat_id[c]) for im in fixture for c in im["instance_categories"]]
    captions = [(im["image_id"], c["caption"]) for im in fixture for c in im["captions"]]
    root = tmp_path / "coco80"
    write_coco(root, "val2014", images, instances, captions, categories)
    records, _ = coco.evaluation_set(root, n=80, vocab=vocab, progress=False)
    expected = {im["image_id"]: set(im["expected_gt_objects"]) for im in fixture}
    assert {r.image_id: set(r.objects) for r in records} == expected
    # The precomputed file for all of COCO 2014 agrees on these images.
    precomputed = coco.load_ground_truth_json(packaged.path(packaged.CHAIR_GT_COCO2014))
    assert {i: precomputed[i] for i in expected} == expected


def test_tfds_source_needs_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="pip install tensorflow tensorflow-datasets"):
        coco.export_tfds_coco(tmp_path / "out")


def test_tfds_export_writes_a_coco_folder(tmp_path, monkeypatch):
    """Against a stand-in for tensorflow_datasets with TFDS's COCO feature layout."""
    jpeg = tmp_path / "src.jpg"
    PIL.Image.new("RGB", (8, 6), (200, 10, 10)).save(jpeg)
    raw = jpeg.read_bytes()
    examples = [{"image": raw, "image/filename": b"COCO_val2014_000000000042.jpg", "image/id": 42,
                 "objects": {"label": np.array([16, 0]), "id": np.array([7, 8])}},
                {"image": raw, "image/filename": b"COCO_val2014_000000000043.jpg", "image/id": 43,
                 "objects": {"label": np.array([], np.int64), "id": np.array([], np.int64)}}]
    label_names = ["person"] + [f"thing_{k}" for k in range(1, 16)] + ["dog"]
    features = {"objects": {"label": types.SimpleNamespace(names=label_names)}}
    builder = types.SimpleNamespace(info=types.SimpleNamespace(features=features),
                                    as_dataset=lambda split, decoders: examples)
    fake = types.SimpleNamespace(builder=lambda name, data_dir=None: builder, as_numpy=lambda ds: iter(ds),
                                 decode=types.SimpleNamespace(SkipDecoding=lambda: None))
    monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    out = tmp_path / "out"
    coco.export_tfds_coco(out)
    assert (out / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes() == raw
    split = coco.load_coco_split(out, "val2014", with_captions=False)
    assert sorted(split.images) == [42, 43]
    names = {c["id"]: c["name"] for c in split.categories}
    assert sorted(names[a["category_id"]] for a in split.instances if a["image_id"] == 42) == ["dog", "person"]
    assert names[3] == "thing 3"
