"""Tests of the synthetic grounded world (scenes, captions, hallucination prior, vocabulary).

References are independent of the generator: captions are parsed back with `inflect`
(plural -> singular) and hand-written word lists, positions are recomputed from pixel
boxes, colours are recognised from pixels with hand-written RGB rules, and the class nouns
are checked against the COCO / LVIS category lists.
"""
import dataclasses
import functools
import json
import math
import re
import time

import inflect
import numpy as np
import pytest

from fisao_jax import packaged
from fisao_jax.data import synthetic
from fisao_jax.data.synthetic import WorldConfig

_INFLECT = inflect.engine()
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_COLOUR_WORDS = {"red", "green", "blue", "yellow", "purple", "pink", "white", "black", "brown", "gray"}
_POSITION_WORDS = {"top", "bottom", "left", "right", "center"}

# What each colour name means, as a rule on an RGB pixel (hand-written, not the palette).
_COLOUR_RULES = {
    "red": lambda r, g, b: (r > 170) & (g < 70) & (b < 70),
    "green": lambda r, g, b: (g > 130) & (r < 100) & (b < 110),
    "blue": lambda r, g, b: (b > 170) & (r < 90) & (g < 130),
    "yellow": lambda r, g, b: (r > 200) & (g > 170) & (b < 90),
    "purple": lambda r, g, b: (r > 100) & (r < 170) & (g < 90) & (b > 150),
    "pink": lambda r, g, b: (r > 220) & (g > 100) & (g < 170) & (b > 150),
    "white": lambda r, g, b: (r > 225) & (g > 225) & (b > 225),
    "black": lambda r, g, b: (r < 45) & (g < 45) & (b < 45),
    "brown": lambda r, g, b: (r > 100) & (r < 150) & (g > 55) & (g < 100) & (b < 60),
    "gray": lambda r, g, b: (np.abs(r.astype(int) - g) < 15) & (np.abs(g.astype(int) - b) < 15) & (r > 140) & (r < 200),
}


@functools.lru_cache(maxsize=None)
def _singular(word):
    """Class noun a caption word names, with whether it was plural (None if not a class)."""
    single = _INFLECT.singular_noun(word)
    if single and single in synthetic.CLASS_NAMES:
        return single, True
    if word in synthetic.CLASS_NAMES:
        return word, False
    return None, False


def _parse(caption):
    """[(class, count, colour or None, position words or None)] for every class mention."""
    tokens = re.findall(r"[a-z]+", caption.lower())
    mentions = []
    for j, tok in enumerate(tokens):
        name, is_plural = _singular(tok)
        if name is None:
            continue
        k = j - 1
        colour = tokens[k] if tokens[k] in _COLOUR_WORDS else None
        k -= colour is not None
        count = _NUMBERS[tokens[k]]
        assert (count > 1) == is_plural, f"number mismatch at {tok!r} in {caption!r}"
        position = set()
        for t in tokens[j + 1:]:
            if t not in {"in", "the", "at", "on", "corner"} | _POSITION_WORDS:
                break
            position |= {t} & _POSITION_WORDS
        mentions.append((name, count, colour, position or None))
    return mentions


def _expected_position(box, size):
    """Position words from a pixel box centre: thirds of the image."""
    cy, cx = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row, col = int(cy * 3 // size), int(cx * 3 // size)
    words = {0: {"top"}, 1: set(), 2: {"bottom"}}[row] | {0: {"left"}, 1: set(), 2: {"right"}}[col]
    return words or {"center"}


@pytest.fixture(scope="module")
def world():
    cfg = WorldConfig(hallucination_rate=0.3)
    return cfg, synthetic.make_dataset(cfg, 4000, seed=7, split="train")


def test_same_seed_same_data_and_prefix_stable():
    cfg = WorldConfig()
    a = synthetic.make_dataset(cfg, 40, seed=3, split="train")
    b = synthetic.make_dataset(cfg, 40, seed=3, split="train")
    short = synthetic.make_dataset(cfg, 15, seed=3, split="train")
    other_seed = synthetic.make_dataset(cfg, 40, seed=4, split="train")
    other_split = synthetic.make_dataset(cfg, 40, seed=3, split="test")
    assert a["images"].shape == (40, 64, 64, 3) and a["images"].dtype == np.uint8
    np.testing.assert_array_equal(a["images"], b["images"])
    for key in ("captions", "clean_captions", "gt_objects", "clip_texts", "prompts", "hallucinated"):
        assert a[key] == b[key], key
        assert a[key][:15] == short[key], key
    np.testing.assert_array_equal(a["images"][:15], short["images"])
    for other in (other_seed, other_split):
        assert not np.array_equal(a["images"], other["images"])
        assert sum(x == y for x, y in zip(a["captions"], other["captions"])) < 20


def test_hallucination_rate_changes_only_the_injected_mentions():
    never = synthetic.make_dataset(WorldConfig(hallucination_rate=0.0), 300, seed=1)
    always = synthetic.make_dataset(WorldConfig(hallucination_rate=1.0), 300, seed=1)
    np.testing.assert_array_equal(never["images"], always["images"])
    assert never["clean_captions"] == always["clean_captions"]
    assert never["captions"] == never["clean_captions"]
    partner_of = dict(synthetic.DEFAULT_COOCCURRENCE)
    for gt, hal in zip(always["gt_objects"], always["hallucinated"]):
        assert hal == {partner_of[a] for a in gt if a in partner_of and partner_of[a] not in gt}


def test_each_object_is_drawn_in_its_cell_with_its_colour():
    cfg = WorldConfig(colour_jitter=0.0, noise_std=0.0)
    third = cfg.image_size / 3
    data = synthetic.make_dataset(cfg, 300, seed=11)
    seen_colours = set()
    for image, objects, gt, counts in zip(data["images"], data["objects"], data["gt_objects"], data["gt_counts"]):
        assert gt == {o.name for o in objects}
        assert counts == {n: sum(o.name == n for o in objects) for n in gt}
        assert 1 <= len(objects) <= 4
        occupied = set()
        for o in objects:
            y0, x0, y1, x1 = o.box
            cell = (int((y0 + y1) / 2 // third), int((x0 + x1) / 2 // third))
            assert cell not in occupied, "two objects share a cell"
            occupied.add(cell)
            # The whole box stays inside its cell: objects cannot overlap.
            assert y0 >= cell[0] * third - 1 and y1 <= (cell[0] + 1) * third + 1
            assert x0 >= cell[1] * third - 1 and x1 <= (cell[1] + 1) * third + 1
            assert (y1 - y0) * (x1 - x0) >= 30
            r, g, b = np.moveaxis(image[y0:y1, x0:x1].astype(int), -1, 0)
            fraction = _COLOUR_RULES[o.colour](r, g, b).mean()
            assert fraction > 0.1, f"{o.colour} {o.name}: only {fraction:.0%} of its box has that colour"
            seen_colours.add(o.colour)
        # Empty cells hold only the smooth background (no outlines, no paint).
        for row in range(3):
            for col in range(3):
                if (row, col) in occupied:
                    continue
                patch = image[int(row * third) + 1:int((row + 1) * third) - 1, int(col * third) + 1:int((col + 1) * third) - 1]
                deviation = np.abs(patch.astype(int) - np.median(patch, axis=(0, 1))).max()
                assert deviation < 60, f"empty cell {(row, col)} has an edge of {deviation}"
    assert seen_colours == _COLOUR_WORDS  # every colour name was exercised


def test_clean_captions_name_exactly_the_objects_with_counts_colours_positions(world):
    cfg, data = world
    for caption, objects, counts in zip(data["clean_captions"], data["objects"], data["gt_counts"]):
        mentions = _parse(caption)
        assert sorted(m[0] for m in mentions) == sorted(counts), caption
        for name, count, colour, position in mentions:
            assert count == counts[name], caption
            members = [o for o in objects if o.name == name]
            if colour is not None:
                assert all(o.colour == colour for o in members), caption
            if position is not None:
                assert count == 1 and position == _expected_position(members[0].box, cfg.image_size), caption


def test_biased_captions_add_only_absent_partners_of_present_anchors(world):
    cfg, data = world
    partner_of = dict(cfg.cooccurrence)
    n_hallucinated = 0
    for caption, clean, gt, hal in zip(data["captions"], data["clean_captions"], data["gt_objects"], data["hallucinated"]):
        mentions = _parse(caption)
        named = {m[0] for m in mentions}
        assert named == gt | hal, caption
        assert not hal & gt
        assert hal <= {partner_of[a] for a in gt if a in partner_of}
        assert all(m[1] == 1 for m in mentions if m[0] in hal), caption  # "a fork", never "two forks"
        assert sorted(m for m in mentions if m[0] not in hal) == sorted(_parse(clean))
        n_hallucinated += bool(hal)
    assert n_hallucinated > 100


def test_partner_mention_rate_when_absent_matches_hallucination_rate():
    # Only anchors and partners, so that there are many "anchor without partner" events.
    paired = tuple(c for pair in synthetic.DEFAULT_COOCCURRENCE for c in pair)
    cfg = WorldConfig(classes=paired, hallucination_rate=0.3)
    data = synthetic.make_dataset(cfg, 5000, seed=8)
    p = cfg.hallucination_rate
    events = mentioned = clean_mentioned = 0
    for caption, clean, gt in zip(data["captions"], data["clean_captions"], data["gt_objects"]):
        named = {m[0] for m in _parse(caption)}
        named_clean = {m[0] for m in _parse(clean)}
        for anchor, partner in cfg.cooccurrence:
            if anchor in gt and partner not in gt:
                events += 1
                mentioned += partner in named
                clean_mentioned += partner in named_clean
    assert events > 2000
    # Binomial(events, p): 4 standard deviations (a 15% relative bias would fail).
    assert abs(mentioned / events - p) <= 4 * math.sqrt(p * (1 - p) / events), (mentioned, events)
    assert clean_mentioned == 0


def test_partners_usually_accompany_their_anchors_in_scenes(world):
    """The prior is learnable: partners really do co-occur with their anchors in images."""
    cfg, data = world
    with_anchor = partner_with_anchor = without_anchor = partner_without_anchor = 0
    for gt in data["gt_objects"]:
        for anchor, partner in cfg.cooccurrence:
            if anchor in gt:
                with_anchor += 1
                partner_with_anchor += partner in gt
            else:
                without_anchor += 1
                partner_without_anchor += partner in gt
    p_with, p_without = partner_with_anchor / with_anchor, partner_without_anchor / without_anchor
    assert p_with > 0.4 and p_with > 2.5 * p_without, (p_with, p_without)


def test_clip_texts_list_the_exact_objects(world):
    _, data = world
    for text, counts in zip(data["clip_texts"][:500], data["gt_counts"][:500]):
        assert text.startswith("a photo of ") and text.endswith(".")
        assert {m[0]: m[1] for m in _parse(text)} == counts, text


def test_object_crops_hold_their_object():
    cfg = WorldConfig(colour_jitter=0.0, noise_std=0.0)
    scenes = synthetic.make_scenes(cfg, 30, seed=5)
    pairs = synthetic.make_object_dataset(cfg, 30, seed=5, out_size=48)
    assert pairs["images"].shape == (sum(len(s.objects) for s in scenes), 48, 48, 3)
    assert pairs["names"] == [o.name for s in scenes for o in s.objects]
    assert pairs["texts"][0] == f"a photo of a {pairs['names'][0]}."
    objects = [o for s in scenes for o in s.objects]
    for crop, o in zip(pairs["images"], objects):
        r, g, b = np.moveaxis(crop.astype(int), -1, 0)
        assert _COLOUR_RULES[o.colour](r, g, b).mean() > 0.015, o


def test_vocabulary_matches_coco_lvis_and_chair_format():
    cfg = WorldConfig()
    assert len(synthetic.class_names(cfg)) >= 12
    coco = set(json.loads(packaged.path(packaged.COCO_CATEGORIES).read_text()))
    lvis = json.loads(packaged.path(packaged.LVIS_CATEGORIES).read_text())
    lvis_words = {s.replace("_", " ") for c in lvis for s in [c["name"], *c["synonyms"]]}
    for name in cfg.classes:
        assert name in coco or name in lvis_words, name
        assert " " not in name
    lines = synthetic.chair_synonym_lines(cfg)
    # Parsed the way the reference CHAIR reads synonyms.txt: split on ', ', first = node word.
    parsed = [[w.strip() for w in line.split(", ")] for line in lines]
    assert [p[0] for p in parsed] == list(cfg.classes)
    for words in parsed:
        assert _INFLECT.plural(words[0]) in words
    reference_first = packaged.path(packaged.CHAIR_SYNONYMS).read_text().splitlines()[1]
    assert reference_first.split(", ")[0] == "bicycle"  # same separator convention
    expected = sorted({w for c in cfg.classes for w in (c, _INFLECT.plural(c))})
    assert synthetic.entity_names(cfg) == expected


def test_no_other_caption_word_is_a_coco_or_lvis_entity(world):
    """Otherwise a COCO/LVIS entity vocabulary would see phantom objects in the captions."""
    _, data = world
    coco = set(json.loads(packaged.path(packaged.COCO_CATEGORIES).read_text()))
    lvis = json.loads(packaged.path(packaged.LVIS_CATEGORIES).read_text())
    entities = coco | {s.replace("_", " ") for c in lvis for s in [c["name"], *c["synonyms"]]}
    entities |= {_INFLECT.plural(e) for e in list(entities)}
    words = {w for text in data["captions"] + data["clip_texts"] for w in re.findall(r"[a-z]+", text.lower())}
    stray = {w for w in words if w in entities and _singular(w)[0] is None}
    assert not stray


def test_prompts():
    assert synthetic.prompt_text() == "Describe this image."
    rng = np.random.default_rng(0)
    drawn = {synthetic.prompt_text(rng) for _ in range(100)}
    assert drawn == set(synthetic.PROMPTS) and len(drawn) >= 3


@pytest.mark.parametrize("size", [64, 96, 112])
def test_image_sizes(size):
    cfg = WorldConfig(image_size=size)
    data = synthetic.make_dataset(cfg, 20, seed=0)
    assert data["images"].shape == (20, size, size, 3)
    for objects in data["objects"]:
        for o in objects:
            assert 0 <= o.box[0] < o.box[2] <= size and 0 <= o.box[1] < o.box[3] <= size
            assert o.position in synthetic.POSITION_PHRASES


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 20),
        ("classes", ("ball", "cat")),
        ("max_objects", 12),
        ("hallucination_rate", 1.5),
        ("cooccurrence", (("plate", "plate"),)),
        ("cooccurrence", (("plate", "fork"), ("plate", "cup"))),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(WorldConfig(), **{field: value})
    with pytest.raises(ValueError, match="split"):
        synthetic.make_dataset(WorldConfig(), 2, seed=0, split="")


def test_5000_scenes_in_under_10_seconds():
    start = time.perf_counter()
    data = synthetic.make_dataset(WorldConfig(), 5000, seed=0)
    elapsed = time.perf_counter() - start
    assert len(data["captions"]) == 5000
    assert elapsed < 10.0, f"{elapsed:.1f} s"
