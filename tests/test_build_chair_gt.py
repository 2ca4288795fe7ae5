"""tools/build_chair_gt.py: CHAIR ground truth from a COCO annotations folder, against the
80-image reference fixture and the packaged COCO 2014 file."""
import gzip
import json
import pathlib
import subprocess
import sys

import pytest

from fisao_jax import packaged
from fisao_jax.eval import chair
from tools import build_chair_gt

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture80(test_data):
    return json.loads((test_data / "chair" / "chair_gt_construction_fixture_coco80.json").read_text())["images"]


@pytest.fixture(scope="module")
def expected(fixture80):
    return {im["image_id"]: set(im["expected_gt_objects"]) for im in fixture80}


@pytest.fixture(scope="module")
def packaged_gt():
    return chair.load_gt_objects(packaged.path(packaged.CHAIR_GT_COCO2014))


def write_fake_coco(root: pathlib.Path, split: str, images: list[dict]) -> None:
    """annotations/instances_{split}.json + captions_{split}.json holding the fixture's images."""
    names = json.loads(packaged.path(packaged.COCO_CATEGORIES).read_text())
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    cat_id = {c["name"]: c["id"] for c in categories}
    entries = [{"id": im["image_id"], "file_name": f"COCO_{split}_{im['image_id']:012d}.jpg"} for im in images]
    instances = [{"id": k, "image_id": im["image_id"], "category_id": cat_id[c]}
                 for k, (im, c) in enumerate((im, c) for im in images for c in im["instance_categories"])]
    captions = [{"id": k, "image_id": im["image_id"], "caption": c["caption"]}
                for k, (im, c) in enumerate((im, c) for im in images for c in im["captions"])]
    folder = root / "annotations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"instances_{split}.json").write_text(
        json.dumps({"images": entries, "annotations": instances, "categories": categories}))
    (folder / f"captions_{split}.json").write_text(json.dumps({"images": entries, "annotations": captions}))


def test_fixture_folder_gives_the_expected_objects_and_the_packaged_file(tmp_path, fixture80, expected,
                                                                       packaged_gt):
    root = tmp_path / "coco"
    write_fake_coco(root, "val2014", fixture80)
    out = tmp_path / "gt.json.gz"
    build_chair_gt.main(["--coco_root", str(root), "--splits", "val2014", "--out", str(out), "--no_progress"])
    built = chair.load_gt_objects(out)
    assert built == expected
    assert {i: packaged_gt[i] for i in expected} == built
    # same file format as the packaged file, byte for byte, on these images
    assert gzip.decompress(out.read_bytes()) == build_chair_gt.encode({i: packaged_gt[i] for i in expected})
    again = tmp_path / "again.json.gz"
    build_chair_gt.main(["--coco_root", str(root), "--splits", "val2014", "--out", str(again), "--no_progress"])
    assert again.read_bytes() == out.read_bytes()  # no time stamp in the gzip header
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json.gz", "coco", "gt.json.gz"]


def test_packaged_file_is_in_the_tool_format():
    raw = gzip.decompress(packaged.path(packaged.CHAIR_GT_COCO2014).read_bytes())
    doc = json.loads(raw)
    assert len(doc) == 123287
    assert build_chair_gt.encode({int(k): set(v) for k, v in doc.items()}) == raw


def test_default_splits_are_merged(tmp_path, fixture80, expected):
    root = tmp_path / "coco"
    write_fake_coco(root, "train2014", fixture80[:30])
    write_fake_coco(root, "val2014", fixture80[30:])
    assert build_chair_gt.build_ground_truth(root, progress=False) == expected


def test_cli_from_another_folder(tmp_path, fixture80, expected):
    write_fake_coco(tmp_path / "coco", "val2017", fixture80[:5])
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "build_chair_gt.py"), "--coco_root", "coco",
                           "--splits", "val2017", "--out", "val2017.json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "5 images (0 without objects) from val2017 -> val2017.json" in proc.stdout
    assert "val2017 captions" in proc.stderr  # the progress bar
    written = chair.load_gt_objects(tmp_path / "val2017.json")
    assert written == {i: expected[i] for i in written}


def test_errors_name_the_file_and_key(tmp_path, fixture80):
    root = tmp_path / "coco"
    write_fake_coco(root, "val2014", fixture80[:2])
    out = tmp_path / "gt.json"

    def error(*args):
        with pytest.raises(SystemExit) as e:
            build_chair_gt.main(["--coco_root", str(root), "--out", str(out), "--no_progress", *args])
        return str(e.value.code)

    assert "annotations/instances_train2014.json" in error()  # the default splits need train2014 too
    (root / "annotations" / "captions_val2014.json").unlink()
    assert "annotations/captions_val2014.json" in error("--splits", "val2014")
    write_fake_coco(root, "val2014", fixture80[:2])
    instances = root / "annotations" / "instances_val2014.json"
    doc = json.loads(instances.read_text())
    instances.write_text(json.dumps({k: v for k, v in doc.items() if k != "categories"}))
    message = error("--splits", "val2014")
    assert str(instances) in message and "'categories'" in message
    used = doc["annotations"][0]["category_id"]
    doc["categories"] = [dict(c, name="spaceship") if c["id"] == used else c for c in doc["categories"]]
    instances.write_text(json.dumps(doc))
    message = error("--splits", "val2014")
    assert str(instances) in message and "'spaceship'" in message
    assert not out.exists()
