"""Entity vocabulary: every surface form of an object word -> its canonical category.

SPEC step 3. The entity id used everywhere else (spans, the verifier's text-embedding table)
is the index of a surface form in `EntityVocab.surface_forms`, which is sorted. This module
holds the type and its JSON file (the packaged default included); `entities_build` builds
vocabularies from COCO/LVIS categories or from a list of names.

Surface forms are lower-case ASCII, words separated by single spaces, and start and end
with a letter or digit (`SURFACE_FORM_RE`); matching in text is case-insensitive.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
import re
from typing import Any, Mapping

from fisao_jax import atomic

FORMAT = "fisao_jax.entity_vocab"
FORMAT_VERSION = 1
DEFAULT_VOCAB_RESOURCE = "entities_v1.json"

SURFACE_FORM_RE = re.compile(r"[a-z0-9](?:[a-z0-9 '&.\-]*[a-z0-9])?")


@dataclasses.dataclass(frozen=True)
class EntityVocab:
    """Surface forms (sorted; entity id = index) and the canonical category of each."""

    surface_forms: tuple[str, ...]
    categories: tuple[str, ...]  # canonical category of each surface form
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if len(self.surface_forms) != len(self.categories):
            raise ValueError("surface_forms and categories differ in length")
        if list(self.surface_forms) != sorted(set(self.surface_forms)):
            raise ValueError("surface_forms must be sorted and unique")

    def __len__(self) -> int:
        return len(self.surface_forms)

    def as_dict(self) -> dict[str, str]:
        """{surface form: canonical category}."""
        return dict(zip(self.surface_forms, self.categories))

    def entity_id(self, surface_form: str) -> int:
        """Index of `surface_form` (case-insensitive, whitespace-normalised); -1 if absent."""
        key = normalise_surface_form(surface_form)
        return self._index().get(key, -1)

    def category_of(self, surface_form: str) -> str | None:
        """Canonical category of a surface form, or None if it is not in the vocabulary."""
        i = self.entity_id(surface_form)
        return None if i < 0 else self.categories[i]

    def category_names(self) -> tuple[str, ...]:
        """Distinct canonical categories, sorted."""
        return tuple(sorted(set(self.categories)))

    def _index(self) -> dict[str, int]:
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {s: i for i, s in enumerate(self.surface_forms)}
            object.__setattr__(self, "_index_cache", index)
        return index

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys)."""
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "metadata": dict(self.metadata),
               "entities": self.as_dict()}
        return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON atomically (temp file + rename)."""
        atomic.write_text(path, self.to_json())


def normalise_surface_form(text: str) -> str:
    """Lower-case, underscores and runs of whitespace to single spaces, stripped."""
    return " ".join(text.replace("_", " ").lower().split())


def vocab_from_mapping(mapping: Mapping[str, str], metadata: Mapping[str, Any] | None = None,
                       source: str = "<mapping>") -> EntityVocab:
    """Build an `EntityVocab` from {surface form: category}, validating every entry.

    Raises ValueError naming `source` and the offending entry when a surface form is not a
    valid normalised form or a category is not itself a surface form mapping to itself.
    """
    for surface, category in mapping.items():
        if not isinstance(surface, str) or not isinstance(category, str):
            raise ValueError(f"{source}: entity {surface!r} -> {category!r}: both must be strings")
        if not SURFACE_FORM_RE.fullmatch(surface) or normalise_surface_form(surface) != surface:
            raise ValueError(f"{source}: surface form {surface!r} is not lower-case ASCII "
                             f"words matching {SURFACE_FORM_RE.pattern}")
        if mapping.get(category) != category:
            raise ValueError(f"{source}: category {category!r} (of {surface!r}) must itself be "
                             f"an entity mapping to itself")
    forms = tuple(sorted(mapping))
    return EntityVocab(forms, tuple(mapping[s] for s in forms), dict(metadata or {}))


def load_entity_vocab(path: str | os.PathLike | None = None) -> EntityVocab:
    """Load an entity vocabulary JSON file; `None` loads the packaged default vocabulary."""
    if path is None:
        resource = importlib.resources.files("fisao_jax") / "resources" / DEFAULT_VOCAB_RESOURCE
        text, source = resource.read_text(encoding="utf-8"), f"fisao_jax/resources/{DEFAULT_VOCAB_RESOURCE}"
    else:
        source = str(path)
        try:
            text = pathlib.Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"entity vocabulary not found: {source}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{source}: key 'format' must be {FORMAT!r}")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"{source}: unsupported version {doc.get('version')!r} "
                         f"(expected {FORMAT_VERSION})")
    entities = doc.get("entities")
    if not isinstance(entities, dict) or not entities:
        raise ValueError(f"{source}: key 'entities' must be a non-empty object")
    return vocab_from_mapping(entities, doc.get("metadata", {}), source)
