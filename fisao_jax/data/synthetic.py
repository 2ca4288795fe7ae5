"""Synthetic grounded world: datasets, prompts and vocabulary (the public entry point).

Scenes of 1-4 cartoon objects from 16 classes named by real nouns, with exact ground truth,
captions with a controlled hallucination prior, and texts for CLIP pretraining. Scene `i`
of split `split` under seed `seed` depends on nothing else (not on the dataset size), so
datasets of different sizes share their prefix and splits never share a random stream.

    cfg = WorldConfig(hallucination_rate=0.5)
    data = make_dataset(cfg, n=5000, seed=0, split="train")
    data["images"]           # uint8 [n, S, S, 3]
    data["captions"]         # biased captions (SFT targets)
    data["gt_objects"]       # frozenset of class names per scene

Object classes and their shapes live in `synthetic_shapes`, layout and rendering in
`synthetic_scenes`, captions in `synthetic_captions`.
"""
from __future__ import annotations

import zlib

import numpy as np
import tqdm
from PIL import Image

from fisao_jax.data.synthetic_captions import (  # noqa: F401  (re-exported API)
    CLIP_OBJECT_TEMPLATE,
    Caption,
    caption_scene,
    clip_object_text,
    clip_text,
    plural,
)
from fisao_jax.data.synthetic_scenes import (  # noqa: F401  (re-exported API)
    DEFAULT_COOCCURRENCE,
    GRID,
    POSITION_PHRASES,
    Scene,
    SceneObject,
    WorldConfig,
    cell_geometry,
    sample_scene,
)
from fisao_jax.data.synthetic_shapes import CLASS_NAMES, CLASS_SPECS, COLOURS  # noqa: F401  (re-exported API)

PROMPTS: tuple[str, ...] = (
    "Describe this image.",
    "What is in this image?",
    "Describe the objects in this picture.",
    "What do you see in this photo?",
    "Give a short description of this image.",
)
"""Instruction paraphrases; the first one is the default (and the evaluation prompt)."""

# Stream tags: scene and caption randomness are independent, so captions can change
# (rates, templates) without changing a single pixel.
_SCENE_STREAM, _CAPTION_STREAM, _PROMPT_STREAM = 0, 1, 2


def prompt_text(rng: np.random.Generator | None = None) -> str:
    """The default prompt "Describe this image.", or a random paraphrase when rng is given."""
    if rng is None:
        return PROMPTS[0]
    return PROMPTS[int(rng.integers(len(PROMPTS)))]


def class_names(cfg: WorldConfig) -> tuple[str, ...]:
    """Class nouns of the world, in class-index order."""
    return cfg.classes


def chair_synonym_lines(cfg: WorldConfig) -> list[str]:
    """CHAIR synonym lines, one per class: "knife, knives" (node word first, ', '-separated).

    Same format as the reference CHAIR `synonyms.txt`; join with newlines to write a file.
    """
    return [f"{name}, {plural(name)}" for name in cfg.classes]


def entity_names(cfg: WorldConfig) -> list[str]:
    """Entity vocabulary of the world: every class noun and its plural, sorted."""
    return sorted({w for name in cfg.classes for w in (name, plural(name))})


def split_seed(split: str) -> int:
    """Stable integer for a split name (crc32; Python's str hash is salted per process)."""
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    return zlib.crc32(split.encode("utf-8"))


def scene_rng(seed: int, split: str, index: int, stream: int = _SCENE_STREAM) -> np.random.Generator:
    """Generator of one scene's random stream (0 = scene, 1 = caption, 2 = prompt)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, split_seed(split), index, stream])


def make_scenes(cfg: WorldConfig, n: int, seed: int, split: str = "train", progress: bool = False) -> list[Scene]:
    """Scenes 0..n-1 of (seed, split)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    split_seed(split)  # fail on a bad split name even when n == 0
    indices = tqdm.trange(n, desc=f"scenes[{split}]", disable=not progress)
    return [sample_scene(scene_rng(seed, split, i), cfg) for i in indices]


def make_dataset(cfg: WorldConfig, n: int, seed: int, split: str = "train", progress: bool = False) -> dict:
    """n scenes with images, captions, ground truth and CLIP texts.

    Returns a dict:
      images:         uint8 [n, S, S, 3]
      captions:       list[str], biased captions (partner hallucinations), for SFT
      clean_captions: list[str], the same captions without hallucinations
      hallucinated:   list[frozenset[str]], absent partners the biased caption mentions
      gt_objects:     list[frozenset[str]], canonical class names present
      gt_counts:      list[dict[str, int]], objects per class
      objects:        list[tuple[SceneObject, ...]], boxes, colours, cells
      clip_texts:     list[str], exact object lists ("a photo of a ball and two cups.")
      prompts:        list[str], an instruction paraphrase per scene
    """
    scenes = make_scenes(cfg, n, seed, split, progress)
    captions = [caption_scene(scene_rng(seed, split, i, _CAPTION_STREAM), s, cfg) for i, s in enumerate(scenes)]
    size = cfg.image_size
    images = np.stack([s.image for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    return {
        "images": images,
        "captions": [c.text for c in captions],
        "clean_captions": [c.clean_text for c in captions],
        "hallucinated": [c.hallucinated for c in captions],
        "gt_objects": [s.names for s in scenes],
        "gt_counts": [{k: [o.name for o in s.objects].count(k) for k in s.names} for s in scenes],
        "objects": [s.objects for s in scenes],
        "clip_texts": [clip_text(s, cfg) for s in scenes],
        "prompts": [prompt_text(scene_rng(seed, split, i, _PROMPT_STREAM)) for i in range(n)],
    }


def object_crops(scene: Scene, cfg: WorldConfig, out_size: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Each object's grid cell cut out and resized (bilinear) to out_size (default image_size).

    Returns (crops uint8 [k, out, out, 3], class names [k]) in the scene's object order.
    A cell holds exactly one object, so a crop is a clean single-object image.
    """
    out = out_size or cfg.image_size
    cell, offset = cell_geometry(cfg)
    crops = []
    for o in scene.objects:
        row, col = divmod(o.cell, GRID)
        y0, x0 = offset + row * cell, offset + col * cell
        patch = Image.fromarray(scene.image[y0:y0 + cell, x0:x0 + cell])
        crops.append(np.asarray(patch.resize((out, out), Image.BILINEAR)))
    stacked = np.stack(crops) if crops else np.zeros((0, out, out, 3), np.uint8)
    return stacked, [o.name for o in scene.objects]


def make_object_dataset(
    cfg: WorldConfig, n_scenes: int, seed: int, split: str = "train", out_size: int | None = None, progress: bool = False
) -> dict:
    """Single-object CLIP pairs from the crops of n_scenes scenes.

    Returns {"images": uint8 [m, out, out, 3], "names": list[str], "texts": list[str]}, texts
    in the verifier's template ("a photo of a ball."), m = total objects in those scenes.
    """
    images, names = [], []
    for scene in make_scenes(cfg, n_scenes, seed, split, progress):
        crops, crop_names = object_crops(scene, cfg, out_size)
        images.append(crops)
        names += crop_names
    out = out_size or cfg.image_size
    stacked = np.concatenate(images) if images else np.zeros((0, out, out, 3), np.uint8)
    return {"images": stacked, "names": names, "texts": [clip_object_text(n) for n in names]}
