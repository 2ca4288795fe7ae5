"""Building an entity vocabulary, from COCO and LVIS categories or from a list of names.

Categories are the COCO (80) and LVIS v1 (1203) names; surface forms add the dataset's own
synonyms, plural/singular forms (inflect) and WordNet synonyms (nltk), as `ExpansionOptions`
say. `tools/build_entities.py` runs it; the result is an `entities.EntityVocab`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from fisao_jax.rewards.entities import SURFACE_FORM_RE, EntityVocab, normalise_surface_form, vocab_from_mapping

_QUALIFIER_RE = re.compile(r"\([^)]*\)")

# WordNet lexicographer files of things one can see in a photo. Senses outside them
# ("cat" as vomit, "chair" as chairperson's office, "bread" as money) are dropped.
VISUAL_LEXNAMES = (
    "noun.Tops", "noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.object",
    "noun.person", "noun.plant", "noun.substance",
)

# Synonyms too generic or too ambiguous to count as a mention of the category, found by
# reading the default build's WordNet additions.
DEFAULT_STOP_WORDS = frozenset({
    "article", "being", "bullet", "colour", "decoy", "device", "disc", "elastic", "fag",
    "form", "grip", "individual", "item", "lead", "lumber", "mortal", "object", "picture",
    "piece", "pipage", "pry", "pump", "rig", "semi", "set", "shake", "sinker", "someone",
    "somebody", "soul", "squealer", "stays", "steel", "stuff", "tails", "thing", "throne",
    "ticker", "unit", "waterproof",
})


def normalise_category_name(raw: str) -> str:
    """LVIS/COCO name -> canonical form: 'bow_(weapon)' -> 'bow', 'Band_Aid' -> 'band aid'."""
    return normalise_surface_form(_QUALIFIER_RE.sub(" ", raw))


def vocab_from_names(names: Iterable[str], plurals: bool = True) -> EntityVocab:
    """Vocabulary from a plain list of singular object nouns (e.g. a synthetic world's).

    Each name is its own category; with `plurals`, its inflect plural maps to it too.
    """
    engine = _inflect_engine() if plurals else None
    mapping: dict[str, str] = {}
    canon = [normalise_category_name(n) for n in names]
    for name in canon:
        _check_form(name, "vocab_from_names")
        mapping[name] = name
    for name in canon:
        if engine is not None:
            plural = normalise_surface_form(engine.plural_noun(name))
            if SURFACE_FORM_RE.fullmatch(plural):
                mapping.setdefault(plural, name)
    return vocab_from_mapping(mapping, {"source": "names", "plurals": plurals,
                                        "num_categories": len(set(canon))})


def _check_form(form: str, source: str) -> None:
    if not SURFACE_FORM_RE.fullmatch(form):
        raise ValueError(f"{source}: {form!r} is not a valid entity name "
                         f"(lower-case ASCII words matching {SURFACE_FORM_RE.pattern})")


# ----------------------------------------------------------------------------- COCO / LVIS categories

@dataclasses.dataclass(frozen=True)
class ExpansionOptions:
    """How category names are expanded into surface forms.

    wordnet_senses: which WordNet senses of a category give synonyms. 'dataset': the synset
      LVIS lists for the category (COCO names: the LVIS category of the same name, else the
      first noun sense); 'first': the first `max_senses` senses of the name in `pos`;
      'all': every sense in `pos` (the paper's behaviour, noisy: "cat" -> "purge").
    lexnames: keep senses from these lexicographer files only (None: any).
    min_depth: drop senses closer than this to the root of the hypernym tree (over-general).
    max_lemma_rank: keep a synonym only if the category's sense is among the synonym's own
      first `max_lemma_rank` senses, i.e. the word usually means that thing (None: any).
    """

    inflections: bool = True
    inflect_synonyms: bool = True
    wordnet: bool = True
    wordnet_senses: str = "dataset"
    max_senses: int = 1
    pos: tuple[str, ...] = ("n",)
    lexnames: tuple[str, ...] | None = VISUAL_LEXNAMES
    min_depth: int = 4
    max_lemma_rank: int | None = 2
    keep_proper_nouns: bool = False
    max_words: int = 3
    stop_words: frozenset[str] = DEFAULT_STOP_WORDS

    def __post_init__(self):
        if self.wordnet_senses not in ("dataset", "first", "all"):
            raise ValueError(f"wordnet_senses must be 'dataset', 'first' or 'all', "
                             f"got {self.wordnet_senses!r}")
        if not set(self.pos) <= {"n", "v", "a", "s", "r"}:
            raise ValueError(f"pos must be WordNet parts of speech n/v/a/s/r, got {self.pos!r}")

    def as_metadata(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pos"] = list(self.pos)
        d["lexnames"] = None if self.lexnames is None else list(self.lexnames)
        d["stop_words"] = sorted(self.stop_words)
        return d


PAPER_OPTIONS = ExpansionOptions(wordnet_senses="all", pos=("n", "v", "a", "s", "r"),
                                 lexnames=None, min_depth=0, max_lemma_rank=None,
                                 keep_proper_nouns=True, max_words=99, stop_words=frozenset(),
                                 inflect_synonyms=False)


@dataclasses.dataclass(frozen=True)
class Category:
    """One source category: canonical name, its dataset synonyms and WordNet synset."""

    name: str
    source: str  # 'coco' | 'lvis'
    synonyms: tuple[str, ...] = ()
    synset: str | None = None


# Priority of the ways a surface form can arise; the lowest tier claims a contested form.
_TIERS = ("name", "dataset_synonym", "inflection", "wordnet_synonym", "wordnet_inflection")


def read_categories(coco_path: str | os.PathLike | None,
                    lvis_path: str | os.PathLike | None) -> list[Category]:
    """COCO categories (a JSON list of names) then LVIS (list of {name, synonyms, synset}).

    Raises ValueError naming the file and entry when the structure is not as expected.
    """
    categories: list[Category] = []
    if coco_path is not None:
        coco = _read_json(coco_path)
        if not isinstance(coco, list):
            raise ValueError(f"{coco_path}: expected a JSON list of category names")
        for i, entry in enumerate(coco):
            name = entry.get("name") if isinstance(entry, dict) else entry
            if not isinstance(name, str):
                raise ValueError(f"{coco_path}: entry {i} has no category name: {entry!r}")
            categories.append(Category(normalise_category_name(name), "coco"))
    if lvis_path is not None:
        lvis = _read_json(lvis_path)
        if not isinstance(lvis, list):
            raise ValueError(f"{lvis_path}: expected a JSON list of categories")
        for i, entry in enumerate(sorted(lvis, key=lambda e: e.get("id", 0) if isinstance(e, dict) else 0)):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"{lvis_path}: entry {i} lacks a string 'name': {entry!r}")
            raw_synonyms = entry.get("synonyms", [])
            if not isinstance(raw_synonyms, list):
                raise ValueError(f"{lvis_path}: {entry['name']!r}: 'synonyms' must be a list")
            # LVIS joins words with '_'; a literal space separates two synonyms run together
            # ('monitor_(computer_equipment) computer_monitor').
            synonyms = tuple(normalise_category_name(part) for raw in raw_synonyms
                             for part in _QUALIFIER_RE.sub(" ", raw).split())
            words = _QUALIFIER_RE.sub(" ", entry["name"]).split()
            if not words:
                raise ValueError(f"{lvis_path}: entry {i} has an empty name: {entry['name']!r}")
            name = normalise_category_name(words[0])
            categories.append(Category(name, "lvis", synonyms, entry.get("synset")))
    return categories


def build_entity_vocab(categories: Sequence[Category], options: ExpansionOptions = ExpansionOptions(),
                       progress: bool = False) -> EntityVocab:
    """Expand categories into surface forms (deterministic for fixed inputs and options).

    A surface form claimed by several categories goes to the lowest tier in `_TIERS`, then
    to COCO before LVIS, then to the earlier category in the input order; so every category
    name maps to itself.
    """
    wn = _wordnet() if options.wordnet else None
    engine = _inflect_engine() if options.inflections else None
    claims: dict[str, tuple[int, int, str]] = {}
    dropped: dict[str, int] = {}

    def claim(form: str, tier: str, rank: int, category: str) -> None:
        form = normalise_surface_form(form)
        if not SURFACE_FORM_RE.fullmatch(form):
            dropped["not_a_word"] = dropped.get("not_a_word", 0) + 1
            return
        key = (_TIERS.index(tier), rank, category)
        if form not in claims or key < claims[form]:
            claims[form] = key

    ordered = sorted(enumerate(categories), key=lambda ic: (ic[1].source != "coco", ic[0]))
    ranks = {id(c): r for r, (_, c) in enumerate(ordered)}
    lvis_synset_of = _lvis_synset_index(categories)

    for c in categories:
        _check_form(c.name, f"category {c.name!r} ({c.source})")
        claim(c.name, "name", ranks[id(c)], c.name)
        for s in c.synonyms:
            claim(s, "dataset_synonym", ranks[id(c)], c.name)

    iterator = categories
    if progress:
        import tqdm
        iterator = tqdm.tqdm(categories, desc="expanding categories", unit="cat")
    for c in iterator:
        rank = ranks[id(c)]
        base = [c.name, *c.synonyms]
        if engine is not None:
            for form in base:
                for inflected in _inflections(engine, form, wn):
                    claim(inflected, "inflection", rank, c.name)
        if wn is None:
            continue
        for synonym in _wordnet_synonyms(wn, c, options, lvis_synset_of, dropped):
            claim(synonym, "wordnet_synonym", rank, c.name)
            if engine is not None and options.inflect_synonyms:
                for inflected in _inflections(engine, synonym, wn):
                    claim(inflected, "wordnet_inflection", rank, c.name)

    mapping = {form: key[2] for form, key in claims.items()}
    by_tier = {t: 0 for t in _TIERS}
    for key in claims.values():
        by_tier[_TIERS[key[0]]] += 1
    metadata = {
        "num_categories": len({c.name for c in categories}),
        "num_source_categories": {s: sum(c.source == s for c in categories) for s in ("coco", "lvis")},
        "num_surface_forms": len(mapping),
        "surface_forms_by_origin": by_tier,
        "dropped": dict(sorted(dropped.items())),
        "options": options.as_metadata(),
        "wordnet_version": wn.get_version() if wn is not None else None,
    }
    return vocab_from_mapping(mapping, metadata, "build_entity_vocab")


def _lvis_synset_index(categories: Sequence[Category]) -> dict[str, str]:
    """name or dataset synonym -> LVIS synset (first category by input order wins)."""
    index: dict[str, str] = {}
    for c in categories:
        if c.source == "lvis" and c.synset:
            index.setdefault(c.name, c.synset)
    for c in categories:
        if c.source == "lvis" and c.synset:
            for s in c.synonyms:
                index.setdefault(s, c.synset)
    return index


def _senses(wn, c: Category, options: ExpansionOptions, lvis_synset_of: Mapping[str, str]):
    lemma = c.name.replace(" ", "_")
    if options.wordnet_senses == "dataset":
        name = c.synset if c.source == "lvis" and c.synset else lvis_synset_of.get(c.name)
        if name:
            try:
                return [wn.synset(name)]
            except Exception:  # nltk raises WordNetError or ValueError for unknown names
                pass
        return wn.synsets(lemma, pos="n")[:1]
    senses = [s for p in options.pos for s in wn.synsets(lemma, pos=p)]
    return senses[: options.max_senses] if options.wordnet_senses == "first" else senses


def _wordnet_synonyms(wn, c: Category, options: ExpansionOptions,
                      lvis_synset_of: Mapping[str, str], dropped: dict[str, int]) -> list[str]:
    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    out: list[str] = []
    for synset in _senses(wn, c, options, lvis_synset_of):
        if options.lexnames is not None and synset.lexname() not in options.lexnames:
            drop("lexname")
            continue
        if synset.min_depth() < options.min_depth:
            drop("min_depth")
            continue
        for lemma in synset.lemma_names():
            form = normalise_surface_form(lemma)
            if form == c.name or form in c.synonyms:
                continue
            if not options.keep_proper_nouns and lemma != lemma.lower():
                drop("proper_noun")
            elif form in options.stop_words:
                drop("stop_word")
            elif len(form.split()) > options.max_words:
                drop("max_words")
            elif options.max_lemma_rank is not None and synset not in \
                    wn.synsets(lemma, pos=synset.pos())[: options.max_lemma_rank]:
                drop("max_lemma_rank")
            else:
                out.append(form)
    return out


def _inflections(engine, form: str, wn) -> list[str]:
    """Plural of a singular form or singular of a plural one.

    inflect guesses number from spelling alone ('bus' -> singular 'bu', 'skis' -> plural
    'skiss'), so a singular guess is trusted only when inflect round-trips it and, with
    WordNet, when the guess is a noun and the form itself is not ('skis' -> 'ski'; but
    'glasses', 'gas' stay as they are).
    """
    singular = engine.singular_noun(form)
    if singular == form:
        return []
    if singular and engine.plural_noun(singular) == form:
        if wn is None:
            return [singular]
        guess_is_noun = bool(wn.synsets(singular.replace(" ", "_"), pos="n"))
        form_is_lemma = bool(wn.lemmas(form.replace(" ", "_"), pos="n"))
        if guess_is_noun:
            # 'glasses' is both a thing and the plural of 'glass': leave such forms alone.
            return [] if form_is_lemma else [singular]
    plural = engine.plural_noun(form)
    if form.endswith("s") and plural == form + "s":
        return []  # inflect's fallback for words it cannot read: 'thermos' -> 'thermoss'
    return [plural]


def _inflect_engine():
    import inflect
    return inflect.engine()


def _wordnet():
    import warnings

    from nltk.corpus import wordnet as wn
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available"
            wn.ensure_loaded()
    except LookupError:
        raise RuntimeError("nltk's WordNet corpus is not installed; run "
                           "`bash tools/install_wordnet.sh` (or pass --no-wordnet)") from None
    return wn


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"category file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
