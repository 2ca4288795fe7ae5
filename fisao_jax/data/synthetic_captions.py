"""Captions of synthetic scenes, with a controlled hallucination prior, and CLIP texts.

A caption lists the scene's objects grouped by class ("two cups", "a red ball on the left")
in one of several templates. The *biased* caption (used for supervised fine-tuning)
additionally mentions, with probability `cfg.hallucination_rate`, the absent partner of
each present anchor ("plate" -> "a fork"), placed right after the anchor, exactly where a
true partner would be; that is the language prior a captioner trained on it learns. The
*clean* caption is the same sentence without the injected mentions.

Every random draw is made whatever the rates are, so a change of `hallucination_rate`
changes only which mentions are injected, never the template, order or wording.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fisao_jax.data.synthetic_scenes import GRID, POSITION_PHRASES, Scene, WorldConfig
from fisao_jax.data.synthetic_shapes import CLASS_SPECS

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CLIP_OBJECT_TEMPLATE = "a photo of a {}."
"""Single-entity text, the verifier's default template (article kept as "a" on purpose)."""


@dataclasses.dataclass(frozen=True)
class _Group:
    """Objects of one class as the caption describes them (colour/position may be None)."""

    name: str
    count: int
    colour: str | None
    position: str | None


@dataclasses.dataclass(frozen=True)
class Caption:
    """Biased text, clean text, and the absent partners the biased text mentions."""

    text: str
    clean_text: str
    hallucinated: frozenset[str]
    template: int


def plural(name: str) -> str:
    """Plural of a class noun ("knife" -> "knives")."""
    return CLASS_SPECS[name].plural


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(group: _Group, with_colour: bool, with_position: bool) -> str:
    colour = group.colour if with_colour and CLASS_SPECS[group.name].says_colour else None
    words = [colour] if colour else []
    if group.count == 1:
        words.append(group.name)
        words.insert(0, _article(words[0]))
    else:
        words.append(plural(group.name))
        words.insert(0, NUMBER_WORDS[group.count])
    if with_position and group.count == 1 and group.position:
        words.append(group.position)
    return " ".join(words)


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _be(group: _Group) -> str:
    return "is" if group.count == 1 else "are"


def _render(template: int, groups: list[_Group]) -> str:
    """One caption from `groups` (in mention order) with template number `template`."""
    if template == 0:
        return f"A photo of {_join([_noun_phrase(g, False, False) for g in groups])}."
    if template == 1:
        return f"There {_be(groups[0])} {_join([_noun_phrase(g, True, True) for g in groups])}."
    if template == 2:
        return f"This image shows {_join([_noun_phrase(g, True, False) for g in groups])}."
    if template == 3:
        return f"In this picture we see {_join([_noun_phrase(g, False, True) for g in groups])}."
    if template == 4:
        return _capitalise(_join([_noun_phrase(g, True, True) for g in groups])) + "."
    if template == 5:
        sentences = [f"The image shows {_noun_phrase(groups[0], True, True)}."]
        sentences += [f"There {_be(g)} also {_noun_phrase(g, True, True)}." for g in groups[1:]]
        return " ".join(sentences)
    raise ValueError(f"caption template {template} does not exist (0-{NUM_TEMPLATES - 1})")


NUM_TEMPLATES = 6


def _scene_groups(scene: Scene) -> dict[str, _Group]:
    groups = {}
    for name in dict.fromkeys(o.name for o in scene.objects):
        members = [o for o in scene.objects if o.name == name]
        colours = {o.colour for o in members}
        groups[name] = _Group(
            name=name,
            count=len(members),
            colour=members[0].colour if len(colours) == 1 else None,
            position=members[0].position if len(members) == 1 else None,
        )
    return groups


def caption_scene(rng: np.random.Generator, scene: Scene, cfg: WorldConfig) -> Caption:
    """Biased and clean captions of `scene` (template, mention order and injections from rng)."""
    groups = _scene_groups(scene)
    template = int(rng.integers(NUM_TEMPLATES))
    order = [list(groups)[i] for i in rng.permutation(len(groups))]
    # A true partner follows its anchor, the same slot an injected one takes.
    partner_of = cfg.partner_of
    for anchor in list(order):
        partner = partner_of.get(anchor)
        if partner in groups:
            order.remove(partner)
            order.insert(order.index(anchor) + 1, partner)

    free_cells = sorted(set(range(GRID * GRID)) - {o.cell for o in scene.objects})
    injected: dict[str, _Group] = {}
    for anchor, partner in cfg.cooccurrence:  # fixed order: same draws for any rate
        coin = rng.random()
        colour_pick = int(rng.integers(len(CLASS_SPECS[partner].palette)))
        cell_pick = int(rng.integers(len(free_cells)))
        if anchor in groups and partner not in groups and coin < cfg.hallucination_rate:
            injected[anchor] = _Group(
                name=partner,
                count=1,
                colour=CLASS_SPECS[partner].palette[colour_pick],
                position=POSITION_PHRASES[free_cells[cell_pick]],
            )

    clean = [groups[n] for n in order]
    biased = []
    for name in order:
        biased.append(groups[name])
        if name in injected:
            biased.append(injected[name])
    return Caption(
        text=_render(template, biased),
        clean_text=_render(template, clean),
        hallucinated=frozenset(g.name for g in injected.values()),
        template=template,
    )


def clip_text(scene: Scene, cfg: WorldConfig) -> str:
    """Short text listing a scene's objects in class order, for contrastive pretraining.

    E.g. "a photo of a ball, two cups and a fork." (exact: no hallucinations).
    """
    groups = _scene_groups(scene)
    ordered = [groups[n] for n in cfg.classes if n in groups]
    return f"a photo of {_join([_noun_phrase(g, False, False) for g in ordered])}."


def clip_object_text(name: str, template: str = CLIP_OBJECT_TEMPLATE) -> str:
    """Single-object text in the verifier's format: "a photo of a ball."."""
    return template.format(name)
