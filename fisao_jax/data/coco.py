"""COCO images and annotations from a local folder: calibration and evaluation subsets.

Layout (as downloaded from cocodataset.org):

    {root}/annotations/instances_{split}.json   images, instance annotations, categories
    {root}/annotations/captions_{split}.json    caption annotations
    {root}/{split}/{file_name}                  images, e.g. val2014/COCO_val2014_000000000042.jpg

Subsets (`coco_subset`, and its presets `calibration_set` = 5000 train2014 images and
`evaluation_set` = 500 val2014 images): the split's image ids in ascending order are
permuted with `numpy.random.default_rng(seed)` and the first `n` usable images are taken;
the result is sorted by image id. With `on_error='raise'` (default) an image file that is
missing or unreadable is an error, so a subset never silently changes; with 'skip' the
walk continues past it and the report counts it.

Ground-truth objects follow the CHAIR rules (instance categories plus the node words of the
reference captions) via `fisao_jax.eval.chair.ground_truth_from_coco`, or come from a
precomputed `{image_id: [objects]}` JSON(.gz) such as the packaged COCO 2014 train+val file
(`fisao_jax.packaged.path(fisao_jax.packaged.CHAIR_GT_COCO2014)`; `tools/build_chair_gt.py`
builds one for other splits or COCO versions).

`export_tfds_coco` turns the TensorFlow Datasets copy of COCO into this layout (original
JPEG bytes, instance annotations; TFDS has no captions, so pair it with a precomputed
ground-truth file). It needs TensorFlow and tensorflow-datasets.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from fisao_jax import atomic
from fisao_jax.data import image as image_lib

SKIP_REASONS = ("missing_image", "unreadable_image", "no_ground_truth")


@dataclasses.dataclass(frozen=True)
class CocoImage:
    """One image listed in an instances file. `path` is where it should be on disk."""

    image_id: int
    file_name: str
    path: str
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class CocoRecord:
    """One subset member: image, ground-truth CHAIR objects (node words), reference captions."""

    image_id: int
    image_path: str
    objects: frozenset[str]
    captions: tuple[str, ...]


@dataclasses.dataclass
class CocoSplit:
    """Annotations of one split. Raw COCO annotation dicts are kept for ground truth."""

    root: str
    split: str
    images: dict[int, CocoImage]
    instances: list[dict]
    categories: list[dict]
    captions: list[dict] | None


@dataclasses.dataclass
class SubsetReport:
    """What `coco_subset` did: images examined, kept, skipped by reason (first few shown)."""

    split: str
    requested: int
    examined: int = 0
    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped image under `reason`, keeping the first few messages."""
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(message)

    def summary(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"COCO {self.split}: requested {self.requested}, examined {self.examined}, kept {self.kept}, "
                 f"skipped {sum(self.skipped.values())}"]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                lines.append(f"  {reason}: {self.skipped[reason]}")
                lines.extend(f"    e.g. {m}" for m in self.examples.get(reason, []))
        return "\n".join(lines)


def read_json(path: str | os.PathLike) -> Any:
    """JSON or JSON.gz file; errors name the file (and line/column for bad JSON)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def annotation_path(root: str | os.PathLike, kind: str, split: str) -> str:
    """`{root}/annotations/{kind}_{split}.json`, kind 'instances' or 'captions'."""
    return os.path.join(os.fspath(root), "annotations", f"{kind}_{split}.json")


def _require(data: Any, keys: Sequence[str], path: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {list(keys)}, got {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing list {key!r}")


def _check_entries(entries: list, keys: Sequence[str], path: str, section: str) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(k not in entry for k in keys):
            raise ValueError(f"{path}: {section}[{i}] needs keys {list(keys)}, got {entry!r:.200}")


def load_coco_split(root: str | os.PathLike, split: str, with_captions: bool = True) -> CocoSplit:
    """Read `instances_{split}.json` (and `captions_{split}.json`) under `{root}/annotations`.

    Raises FileNotFoundError / ValueError naming the file for a missing file, bad JSON, a
    missing key, or an annotation whose image_id is not among the file's images.
    """
    root = os.fspath(root)
    path = annotation_path(root, "instances", split)
    data = read_json(path)
    _require(data, ("images", "annotations", "categories"), path)
    _check_entries(data["images"], ("id", "file_name"), path, "images")
    _check_entries(data["annotations"], ("image_id", "category_id"), path, "annotations")
    _check_entries(data["categories"], ("id", "name"), path, "categories")
    images = {}
    for entry in data["images"]:
        image_id = int(entry["id"])
        images[image_id] = CocoImage(image_id=image_id, file_name=entry["file_name"],
                                     path=os.path.join(root, split, entry["file_name"]),
                                     height=int(entry.get("height", 0)), width=int(entry.get("width", 0)))
    _check_image_ids(data["annotations"], images, path)
    category_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        if ann["category_id"] not in category_ids:
            raise ValueError(f"{path}: annotations[{i}] has unknown category_id {ann['category_id']}")
    captions = None
    if with_captions:
        cap_path = annotation_path(root, "captions", split)
        cap_data = read_json(cap_path)
        _require(cap_data, ("annotations",), cap_path)
        _check_entries(cap_data["annotations"], ("image_id", "caption"), cap_path, "annotations")
        _check_image_ids(cap_data["annotations"], images, cap_path)
        captions = cap_data["annotations"]
    return CocoSplit(root=root, split=split, images=images, instances=data["annotations"],
                     categories=data["categories"], captions=captions)


def _check_image_ids(annotations: list[dict], images: Mapping[int, CocoImage], path: str) -> None:
    for i, ann in enumerate(annotations):
        if int(ann["image_id"]) not in images:
            raise ValueError(f"{path}: annotations[{i}] refers to image_id {ann['image_id']}, "
                             "which is not in the instances file's images")


def load_ground_truth_json(path: str | os.PathLike) -> dict[int, set[str]]:
    """Precomputed ground truth: JSON(.gz) object `{image_id: [object, ...]}`."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)}: expected a JSON object {{image_id: [objects]}}")
    out = {}
    for key, objects in data.items():
        try:
            image_id = int(key)
        except ValueError:
            raise ValueError(f"{os.fspath(path)}: key {key!r} is not an integer image id") from None
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise ValueError(f"{os.fspath(path)}: entry {key!r} must be a list of object names")
        out[image_id] = set(objects)
    return out


def ground_truth_objects(split: CocoSplit, image_ids: Sequence[int] | None = None, vocab=None) -> dict[int, set[str]]:
    """CHAIR ground truth of `image_ids` (default all) from the split's annotations.

    Needs captions (`with_captions=True`). `vocab`: a `fisao_jax.eval.chair.ChairVocab`
    (default: the reference synonym table).
    """
    from fisao_jax.eval import chair  # lazy: pulls in nltk and the synonym table

    if split.captions is None:
        raise ValueError(f"COCO {split.split}: CHAIR ground truth needs the captions file "
                         f"({annotation_path(split.root, 'captions', split.split)}) or a precomputed ground-truth JSON")
    wanted = set(split.images) if image_ids is None else {int(i) for i in image_ids}
    instances = [a for a in split.instances if int(a["image_id"]) in wanted]
    captions = [a for a in split.captions if int(a["image_id"]) in wanted]
    gt = chair.ground_truth_from_coco(instances, split.categories, captions, vocab)
    return {image_id: set(gt.get(image_id, ())) for image_id in wanted}


def _captions_by_image(split: CocoSplit) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ann in split.captions or ():
        out.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    return out


def coco_subset(root: str | os.PathLike, split: str, n: int, seed: int = 0,
                ground_truth: str | os.PathLike | Mapping[int, Any] | None = None, on_error: str = "raise",
                check_images: str = "exists", with_captions: bool = True, vocab=None,
                progress: bool = True) -> tuple[list[CocoRecord], SubsetReport]:
    """`n` seeded images of `split` with ground-truth objects and captions, sorted by id.

    ground_truth: None (CHAIR rules on this split's annotations), a path to a precomputed
      JSON(.gz), or a mapping {image_id: objects}. An image missing from a given ground
      truth is an error (or skipped with on_error='skip').
    on_error: 'raise' or 'skip' for missing/unreadable images and missing ground truth.
    check_images: 'exists', 'open' or 'decode' (see `image.check_image_file`).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    coco = load_coco_split(root, split, with_captions=with_captions)
    given_gt, gt_name = None, None
    if isinstance(ground_truth, (str, os.PathLike)):
        gt_name = os.fspath(ground_truth)
        given_gt = load_ground_truth_json(ground_truth)
    elif ground_truth is not None:
        gt_name, given_gt = "the given ground truth", ground_truth
    elif not with_captions:
        raise ValueError("ground_truth=None computes CHAIR ground truth from captions: needs with_captions=True")

    report = SubsetReport(split=split, requested=n)
    ids = np.array(sorted(coco.images), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen: list[CocoImage] = []
    walk = iter(order)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"COCO {split} images", unit="image")
    for index in walk:
        if len(chosen) == n:
            break
        info = coco.images[int(ids[index])]
        report.examined += 1
        problem = image_lib.check_image_file(info.path, check_images)
        reason = None
        if problem is not None:
            reason = "missing_image" if not os.path.isfile(info.path) else "unreadable_image"
            message = f"image_id {info.image_id}: {problem}"
        elif given_gt is not None and info.image_id not in given_gt:
            reason, message = "no_ground_truth", f"image_id {info.image_id} is not in {gt_name}"
        if reason is not None:
            if on_error == "raise":
                raise (FileNotFoundError if reason == "missing_image" else ValueError)(f"COCO {split}: {message}")
            report.skip(reason, message)
            continue
        chosen.append(info)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if len(chosen) < n:
        raise ValueError(f"COCO {split}: only {len(chosen)} usable images of {len(ids)}, {n} requested\n"
                         + report.summary())
    chosen.sort(key=lambda info: info.image_id)
    if given_gt is None:
        gt = ground_truth_objects(coco, [info.image_id for info in chosen], vocab)
    else:
        gt = {info.image_id: given_gt[info.image_id] for info in chosen}
    captions = _captions_by_image(coco)
    records = [CocoRecord(image_id=info.image_id, image_path=info.path, objects=frozenset(gt[info.image_id]),
                          captions=tuple(captions.get(info.image_id, ()))) for info in chosen]
    report.kept = len(records)
    return records, report


def calibration_set(root: str | os.PathLike, n: int = 5000, seed: int = 0, split: str = "train2014",
                    **kwargs) -> tuple[list[CocoRecord], SubsetReport]:
    """Calibration images for the baseline scores: `n` seeded train images (see `coco_subset`)."""
    return coco_subset(root, split, n, seed, **kwargs)


def evaluation_set(root: str | os.PathLike, n: int = 500, seed: int = 0, split: str = "val2014",
                   **kwargs) -> tuple[list[CocoRecord], SubsetReport]:
    """The CHAIR evaluation images: `n` seeded val images (see `coco_subset`)."""
    return coco_subset(root, split, n, seed, **kwargs)


def _import_tfds():
    try:
        import tensorflow  # noqa: F401  (tensorflow-datasets needs it to read records)
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "the TFDS COCO source needs TensorFlow and tensorflow-datasets "
            "(pip install tensorflow tensorflow-datasets); without them, download COCO into "
            "{root}/annotations and {root}/{split}/ and use load_coco_split") from None
    return tfds


def export_tfds_coco(out_root: str | os.PathLike, split: str = "val2014", tfds_split: str = "validation",
                     tfds_name: str = "coco/2014", data_dir: str | None = None, limit: int | None = None) -> str:
    """Write a TFDS COCO split as `{out_root}/{split}/*.jpg` + `annotations/instances_{split}.json`.

    Images are the original encoded bytes (no re-encoding). Category ids are TFDS label
    indices, names TFDS label names with '_' as ' '. No captions file is written (TFDS has
    none): use a precomputed ground truth with `with_captions=False`. Returns the
    instances file path.
    """
    tfds = _import_tfds()
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    label_names = builder.info.features["objects"]["label"].names
    dataset = builder.as_dataset(split=tfds_split, decoders={"image": tfds.decode.SkipDecoding()})
    image_dir = os.path.join(os.fspath(out_root), split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(os.fspath(out_root), "annotations"), exist_ok=True)
    images, annotations = [], []
    from tqdm import tqdm
    for i, example in enumerate(tqdm(tfds.as_numpy(dataset), desc=f"TFDS {tfds_name} {tfds_split}", total=limit)):
        if limit is not None and i >= limit:
            break
        file_name = _text(example["image/filename"])
        image_id = int(example["image/id"])
        atomic.write_bytes(os.path.join(image_dir, file_name), bytes(example["image"]))
        images.append({"id": image_id, "file_name": file_name})
        objects = example["objects"]
        for j, label in enumerate(np.asarray(objects["label"]).tolist()):
            annotations.append({"id": int(np.asarray(objects["id"])[j]), "image_id": image_id,
                                "category_id": int(label)})
    categories = [{"id": k, "name": name.replace("_", " ")} for k, name in enumerate(label_names)]
    path = annotation_path(out_root, "instances", split)
    atomic.write_text(path, json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)
