"""Build CHAIR's ground-truth objects {image_id: [node words]} from COCO annotation files.

An image's ground truth is the CHAIR node words of its instance categories plus those of
its reference captions, under the reference rules and synonym table
(`fisao_jax.eval.chair`). The packaged
fisao_jax/resources/chair/coco2014_trainval_chair_gt_objects.json.gz is this tool's output on
COCO 2014 train + val, which the reference CHAIR uses together:

    python tools/build_chair_gt.py --coco_root /data/coco --out coco2014_trainval_chair_gt_objects.json.gz

Other splits or COCO versions (same annotation format):

    python tools/build_chair_gt.py --coco_root /data/coco2017 --splits val2017 --out val2017_chair_gt.json.gz

Reads {coco_root}/annotations/instances_{split}.json and captions_{split}.json of every
split. The output is compact JSON (gzipped when --out ends in .gz), keys in ascending
image id, objects sorted; every image of an instances file is a key, with [] when it has
no objects. Same inputs give the same bytes (the gzip header carries no time stamp); the
file is written whole or not at all. COCO 2014 train + val (616k captions) takes minutes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import sys
from typing import Mapping, Sequence

from tqdm import tqdm

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fisao_jax import atomic  # noqa: E402
from fisao_jax.data import coco  # noqa: E402
from fisao_jax.eval import chair  # noqa: E402

DEFAULT_SPLITS = ("train2014", "val2014")


def build_ground_truth(coco_root: str | os.PathLike, splits: Sequence[str] = DEFAULT_SPLITS,
                       vocab: chair.ChairVocab | None = None, progress: bool = True) -> dict[int, set[str]]:
    """{image_id: set of node words} over every image of `splits` under `coco_root`.

    Raises FileNotFoundError / ValueError naming the annotation file at fault (missing file,
    bad JSON, missing key, a category outside the synonym table).
    """
    vocab = vocab or chair.coco_vocab()
    out: dict[int, set[str]] = {}
    for split in splits:
        data = coco.load_coco_split(coco_root, split, with_captions=True)
        instances = tqdm(data.instances, desc=f"{split} instances", unit="ann", disable=not progress)
        captions = tqdm(data.captions, desc=f"{split} captions", unit="caption", disable=not progress)
        try:
            gt = chair.ground_truth_from_coco(instances, data.categories, captions, vocab)
        except ValueError as err:
            raise ValueError(f"{coco.annotation_path(coco_root, 'instances', split)}: {err}") from None
        for image_id in data.images:
            out.setdefault(image_id, set()).update(gt.get(image_id, ()))
    return out


def encode(gt: Mapping[int, set[str]]) -> bytes:
    """The file format: compact JSON {"image_id": [sorted objects]}, keys in ascending id."""
    doc = {str(image_id): sorted(gt[image_id]) for image_id in sorted(gt)}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def write(path: str | os.PathLike, gt: Mapping[int, set[str]]) -> None:
    """`gt` to `path` atomically, gzipped (without a time stamp) when the name ends in .gz."""
    data = encode(gt)
    if os.fspath(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    atomic.write_bytes(path, data)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco_root", required=True, type=pathlib.Path,
                   help="COCO folder holding annotations/instances_{split}.json and captions_{split}.json")
    p.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS),
                   help="splits to read, merged into one file (default: %(default)s)")
    p.add_argument("--out", required=True, type=pathlib.Path, help="output .json or .json.gz file")
    p.add_argument("--synonyms", help="CHAIR synonyms.txt (default: the packaged reference table)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        vocab = chair.coco_vocab(args.synonyms)
        gt = build_ground_truth(args.coco_root, args.splits, vocab, progress=not args.no_progress)
        write(args.out, gt)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    empty = sum(not objects for objects in gt.values())
    print(f"{len(gt)} images ({empty} without objects) from {', '.join(args.splits)} -> {args.out}")


if __name__ == "__main__":
    main()
