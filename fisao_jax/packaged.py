"""The data files shipped inside the package, under `fisao_jax/resources/`.

Sources, versions and licenses of every file are in `fisao_jax/resources/NOTICE`. Names
below are paths relative to that folder; `path(name)` turns one into a file-system path,
which is what the readers (plain `open`, `gzip.open`) and the command-line defaults need.

    chair/synonyms.txt                                 CHAIR synonym table (80 COCO categories)
    chair/chair_rules.json                             CHAIR's hard-coded rules, as data
    chair/coco2014_trainval_chair_gt_objects.json.gz   {image_id: [node words]}, 123,287 images
    categories/coco_categories.json                    80 COCO category names
    categories/lvis_v1_categories.json                 1203 LVIS v1 categories
    pope/pope_coco_{random,popular,adversarial}.json   official POPE COCO questions, 3000 each
    entities_v1.json                                   the default entity vocabulary
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.resources
import pathlib

CHAIR_SYNONYMS = "chair/synonyms.txt"
CHAIR_RULES = "chair/chair_rules.json"
CHAIR_GT_COCO2014 = "chair/coco2014_trainval_chair_gt_objects.json.gz"
COCO_CATEGORIES = "categories/coco_categories.json"
LVIS_CATEGORIES = "categories/lvis_v1_categories.json"
ENTITY_VOCAB = "entities_v1.json"  # read by fisao_jax.rewards.entities.load_entity_vocab
POPE_SPLITS = ("random", "popular", "adversarial")
NOTICE = "NOTICE"


def pope_coco(split: str) -> str:
    """Name of the POPE COCO question file of `split` ('random', 'popular' or 'adversarial')."""
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r} (expected one of {', '.join(POPE_SPLITS)})")
    return f"pope/pope_coco_{split}.json"


ALL = (CHAIR_SYNONYMS, CHAIR_RULES, CHAIR_GT_COCO2014, COCO_CATEGORIES, LVIS_CATEGORIES, ENTITY_VOCAB,
       *(pope_coco(s) for s in POPE_SPLITS), NOTICE)

# Holds the temporary copies `importlib.resources.as_file` makes when the package is imported
# from a zip archive; a regular install gives the files' own paths and holds nothing.
_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)


def traversable(name: str):
    """The packaged file `name` as an `importlib.resources` Traversable (whether or not it exists)."""
    node = importlib.resources.files("fisao_jax").joinpath("resources")
    for part in name.split("/"):  # Traversable.joinpath takes one segment before Python 3.11
        node = node.joinpath(part)
    return node


@functools.lru_cache(maxsize=None)
def path(name: str) -> pathlib.Path:
    """File-system path of the packaged file `name` (e.g. `CHAIR_SYNONYMS`).

    Raises FileNotFoundError naming the file when this installation lacks it.
    """
    node = traversable(name)
    if not node.is_file():
        raise FileNotFoundError(f"packaged data file fisao_jax/resources/{name} is missing from this "
                                "installation of fisao_jax (reinstall the package)")
    if isinstance(node, pathlib.Path):
        return node
    return _EXTRACTED.enter_context(importlib.resources.as_file(node))
