"""Entity vocabulary: builder output, the packaged file, loading and validation."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from fisao_jax import packaged
from fisao_jax.rewards import entities, entities_build

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

PACKAGED = REPO_ROOT / "fisao_jax" / "resources" / entities.DEFAULT_VOCAB_RESOURCE
COCO = packaged.path(packaged.COCO_CATEGORIES)
LVIS = packaged.path(packaged.LVIS_CATEGORIES)


def _wordnet_or_skip():
    try:
        return entities_build._wordnet()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def categories():
    return entities_build.read_categories(COCO, LVIS)


@pytest.fixture(scope="module")
def built(categories):
    _wordnet_or_skip()
    return entities_build.build_entity_vocab(categories)


def test_normalise_category_name():
    assert entities_build.normalise_category_name("bow_(weapon)") == "bow"
    assert entities_build.normalise_category_name("Band_Aid") == "band aid"
    assert entities_build.normalise_category_name("  hot   dog ") == "hot dog"
    assert entities_build.normalise_category_name("wiper_(for_windshield/screen)") == "wiper"


def test_read_categories_normalises_lvis(categories):
    assert len(categories) == 80 + 1203
    by_name = {}
    for c in categories:
        by_name.setdefault((c.source, c.name), c)
    assert by_name[("coco", "hot dog")].synonyms == ()
    # LVIS runs two synonyms together with a space in this entry.
    monitor = next(c for c in categories if c.synset == "monitor.n.04")
    assert (monitor.name, monitor.synonyms) == ("monitor", ("monitor", "computer monitor"))
    bow = [c for c in categories if c.source == "lvis" and c.name == "bow"]
    assert sorted(c.synset for c in bow) == ["bow.n.04", "bow.n.08"]


def test_every_coco_category_maps_to_itself():
    vocab = entities.load_entity_vocab()
    coco = json.loads(COCO.read_text())
    assert [c for c in coco if vocab.category_of(c) != c] == []
    assert len(set(vocab.categories)) == 1214  # distinct COCO + LVIS names after normalising


def test_packaged_vocabulary_expansions():
    vocab = entities.load_entity_vocab()
    expected = {
        "cats": "cat", "people": "person", "hot dogs": "hot dog", "hotdog": "hot dog",
        "teddy bears": "teddy bear", "buses": "bus", "mice": "mouse", "knives": "knife",
        "aeroplane": "airplane", "fridge": "refrigerator", "sofa": "sofa", "Couches": "couch",
        "computer monitor": "monitor", "skis": "skis", "ski": "ski",
    }
    assert {k: vocab.category_of(k) for k in expected} == expected
    # The paper's noisy WordNet senses are left out by default (its Table 6).
    for noise in ("purge", "chuck", "lead", "moderate", "chairman", "lucre", "greaser",
                  "clash", "skiss", "bu"):
        assert vocab.category_of(noise) is None, noise


def test_builder_is_deterministic(built):
    again = entities_build.build_entity_vocab(entities_build.read_categories(COCO, LVIS))
    assert again.to_json() == built.to_json()


def test_packaged_file_is_the_current_builders_output(built):
    """Freshness: the packaged vocabulary is what the builder makes of the packaged category
    lists (a change of the expansion rules must regenerate it). What the rules produce is
    checked by hand below and in `test_packaged_vocabulary_expansions`."""
    packaged_doc = json.loads(PACKAGED.read_text())
    assert packaged_doc["entities"] == built.as_dict()
    assert packaged_doc["metadata"]["command"] == ("python tools/build_entities.py "
                                                   "--out fisao_jax/resources/entities_v1.json")


@pytest.mark.slow
def test_tool_output_is_byte_identical_across_runs(tmp_path):
    _wordnet_or_skip()
    outputs = []
    for name, inputs in (("a.json", []), ("b.json", ["--coco", str(COCO), "--lvis", str(LVIS)])):
        out = tmp_path / name  # the second run names the packaged inputs, the first takes them by default
        cmd = [sys.executable, str(REPO_ROOT / "tools" / "build_entities.py"), "--out", str(out), *inputs]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert "surface forms:" in proc.stdout
        doc = json.loads(out.read_text())
        doc["metadata"].pop("command")
        outputs.append(doc)
    assert outputs[0] == outputs[1]


# ------------------------------------------------------------ the builder's rules by hand
# Hand-made categories and the surface forms the rules in `build_entity_vocab` should give
# them (WordNet 3.0 through nltk, inflect). Singular <-> plural by inflect, trusted only as
# `_inflections` says; WordNet synonyms of one sense ('dataset': the LVIS synset, else the
# first noun sense), kept only when they pass every filter of `_wordnet_synonyms`.

def _build(categories, **options):
    return entities_build.build_entity_vocab(categories, dataclasses.replace(entities_build.ExpansionOptions(), **options))


# lexnames=() drops every WordNet sense: inflections only, with WordNet still consulted
# for the noun checks of `_inflections`.
NO_SYNONYMS = dict(lexnames=())


def test_inflections_by_hand():
    _wordnet_or_skip()
    C = entities_build.Category
    vocab = _build([C("knife", "coco"), C("bus", "coco"), C("mouse", "coco"), C("person", "coco"),
                    C("skis", "coco"), C("glasses", "lvis"), C("thermos", "lvis"),
                    C("sofa", "lvis", synonyms=("couch",))], **NO_SYNONYMS)
    assert vocab.as_dict() == {
        "knife": "knife", "knives": "knife",          # irregular plural
        "bus": "bus", "buses": "bus",                 # not inflect's singular guess 'bu'
        "mouse": "mouse", "mice": "mouse",
        "person": "person", "people": "person",
        "skis": "skis", "ski": "skis",                # plural name -> singular ('skis' is no WordNet lemma)
        "glasses": "glasses",                         # a thing of its own (a WordNet lemma): no 'glass'
        "thermos": "thermos",                         # no 'thermoss' (inflect's fallback plural)
        "sofa": "sofa", "sofas": "sofa", "couch": "sofa", "couches": "sofa",  # dataset synonyms inflect too
    }
    assert vocab.metadata["dropped"] == {"lexname": 8}  # one WordNet sense per category, all dropped
    # the other way round for an irregular plural
    assert _build([C("mice", "coco")], **NO_SYNONYMS).as_dict() == {"mice": "mice", "mouse": "mice"}


def test_multiword_entities_by_hand():
    _wordnet_or_skip()
    C = entities_build.Category
    vocab = _build([C("hot dog", "lvis", synset="hotdog.n.02"), C("teddy bear", "lvis", synset="teddy.n.01")])
    assert vocab.as_dict() == {
        "hot dog": "hot dog", "hot dogs": "hot dog",
        # hotdog.n.02 = {hotdog, hot_dog, red_hot}; 'hotdog' means it in its 2nd sense, kept
        "hotdog": "hot dog", "hotdogs": "hot dog", "red hot": "hot dog", "red hots": "hot dog",
        "teddy bear": "teddy bear", "teddy bears": "teddy bear", "teddy": "teddy bear", "teddies": "teddy bear",
    }
    assert vocab.metadata["dropped"] == {}
    assert _build([C("hot dogs", "coco")], **NO_SYNONYMS).as_dict() == {"hot dogs": "hot dogs",
                                                                        "hot dog": "hot dogs"}
    assert vocab.entity_id("Hot  Dogs") == vocab.surface_forms.index("hot dogs")


def test_wordnet_noise_filters_by_hand():
    """One dropped and one kept synonym for each filter of `_wordnet_synonyms`."""
    _wordnet_or_skip()
    C = entities_build.Category
    vocab = _build([
        # lexname: the money sense of 'bread' (noun.possession: 'lucre', 'dough', ...) is dropped
        # whole; the animal sense of 'cat' (noun.animal) gives 'true cat'
        C("bread", "lvis", synset="boodle.n.01"), C("cat", "lvis", synset="cat.n.01"),
        # min_depth 4: object.n.01 (depth 2 in the hypernym tree) is too general, its
        # 'physical object' dropped; artifact.n.01 (depth 4) keeps 'artefact'
        C("object", "lvis", synset="object.n.01"), C("artifact", "lvis", synset="artifact.n.01"),
        # proper nouns: 'Canis_familiaris' dropped, 'domestic_dog' kept (COCO name: first noun sense)
        C("dog", "coco"),
        # stop words: doughnut.n.02 = {doughnut, donut, sinker}: 'sinker' is a stop word
        C("doughnut", "lvis", synset="doughnut.n.02"),
        # max_words 3: 'horse_of_the_wood' (4 words) dropped, 'capercailzie' kept
        # ('Tetrao_urogallus' is a proper noun)
        C("capercaillie", "lvis", synset="capercaillie.n.01"),
        # max_lemma_rank 2: bus.n.01 is the 5th noun sense of 'coach': dropped; the 2nd of
        # 'omnibus' and the 1st of 'autobus': kept
        C("bus", "coco"),
    ])
    expected = {
        "bread": "bread", "breads": "bread",
        "cat": "cat", "cats": "cat", "true cat": "cat", "true cats": "cat",
        "object": "object", "objects": "object",
        "artifact": "artifact", "artifacts": "artifact", "artefact": "artifact", "artefacts": "artifact",
        "dog": "dog", "dogs": "dog", "domestic dog": "dog", "domestic dogs": "dog",
        "doughnut": "doughnut", "doughnuts": "doughnut", "donut": "doughnut", "donuts": "doughnut",
        "capercaillie": "capercaillie", "capercaillies": "capercaillie",
        "capercailzie": "capercaillie", "capercailzies": "capercaillie",
        "bus": "bus", "buses": "bus", "autobus": "bus", "autobuses": "bus", "omnibus": "bus", "omnibuses": "bus",
        "charabanc": "bus", "charabancs": "bus", "double-decker": "bus", "double-deckers": "bus",
        "jitney": "bus", "jitneys": "bus", "motorbus": "bus", "motorbuses": "bus",
        "motorcoach": "bus", "motorcoaches": "bus", "passenger vehicle": "bus", "passenger vehicles": "bus",
    }
    assert vocab.as_dict() == expected
    assert vocab.metadata["dropped"] == {"lexname": 1, "min_depth": 1, "proper_noun": 2, "stop_word": 1,
                                         "max_words": 1, "max_lemma_rank": 1}
    for noise in ("lucre", "dough", "physical object", "canis familiaris", "sinker", "horse of the wood",
                  "tetrao urogallus", "coach", "coaches"):
        assert vocab.category_of(noise) is None, noise


def test_surface_forms_are_normalised_by_hand():
    _wordnet_or_skip()
    C = entities_build.Category
    vocab = _build([C("hot dog", "lvis", synonyms=("Frank_Furter", "  WIENER   sausage ", "café"))], **NO_SYNONYMS)
    assert vocab.as_dict() == {
        "hot dog": "hot dog", "hot dogs": "hot dog",
        "frank furter": "hot dog", "frank furters": "hot dog",          # '_' -> ' ', lower case
        "wiener sausage": "hot dog", "wiener sausages": "hot dog",      # runs of whitespace, stripped
    }
    # not lower-case ASCII words: 'café' and its plural 'cafés' are dropped
    assert vocab.metadata["dropped"] == {"lexname": 1, "not_a_word": 2}
    # WordNet lemmas too: 'double-decker' keeps its hyphen, 'passenger_vehicle' gets a space (above)
    with pytest.raises(ValueError, match="'Hot Dog'"):
        _build([C("Hot Dog", "coco")], **NO_SYNONYMS)  # category names must already be normalised


def test_contested_forms_go_to_the_lowest_tier_then_coco():
    _wordnet_or_skip()
    C = entities_build.Category
    # 'glasses' is the plural of 'glass' (tier inflection) and a category name (tier name)
    vocab = _build([C("glass", "lvis"), C("glasses", "lvis")], **NO_SYNONYMS)
    assert vocab.category_of("glasses") == "glasses" and vocab.category_of("glass") == "glass"
    # 'couch' is a dataset synonym of two categories: the COCO one wins, listed first or not
    for cats in ([C("sofa", "lvis", synonyms=("couch",)), C("settee", "coco", synonyms=("couch",))],
                 [C("settee", "coco", synonyms=("couch",)), C("sofa", "lvis", synonyms=("couch",))]):
        vocab = _build(cats, **NO_SYNONYMS)
        assert vocab.category_of("couch") == "settee" and vocab.category_of("couches") == "settee"
    # same tier, same source: the earlier category
    vocab = _build([C("sofa", "lvis", synonyms=("couch",)), C("divan", "lvis", synonyms=("couch",))], **NO_SYNONYMS)
    assert vocab.category_of("couch") == "sofa"


def test_paper_preset_reproduces_noise(categories):
    _wordnet_or_skip()
    vocab = entities_build.build_entity_vocab(categories, entities_build.PAPER_OPTIONS)
    assert vocab.category_of("purge") == "cat" and vocab.category_of("chairman") == "chair"
    assert len(vocab) > len(entities.load_entity_vocab())


def test_options_filter_wordnet_synonyms(categories):
    _wordnet_or_skip()
    no_wordnet = entities_build.build_entity_vocab(categories, dataclasses.replace(
        entities_build.ExpansionOptions(), wordnet=False))
    assert no_wordnet.category_of("fridge") is None and no_wordnet.category_of("cats") == "cat"
    stop = entities_build.build_entity_vocab(categories, dataclasses.replace(
        entities_build.ExpansionOptions(), stop_words=frozenset({"fridge"})))
    assert stop.category_of("fridge") is None and stop.category_of("fridges") is None
    # COCO's and LVIS's "refrigerator" share LVIS's synset, so "fridge" is met twice.
    assert stop.metadata["dropped"]["stop_word"] == 2
    animals_only = entities_build.build_entity_vocab(categories, dataclasses.replace(
        entities_build.ExpansionOptions(), lexnames=("noun.animal",)))
    assert animals_only.category_of("fridge") is None
    assert animals_only.category_of("domestic dog") == "dog"


def test_vocab_from_names():
    vocab = entities_build.vocab_from_names(["cat", "Hot_Dog", "person", "bus"])
    assert vocab.as_dict() == {
        "bus": "bus", "buses": "bus", "cat": "cat", "cats": "cat", "hot dog": "hot dog",
        "hot dogs": "hot dog", "people": "person", "person": "person"}
    assert vocab.surface_forms == tuple(sorted(vocab.surface_forms))
    assert vocab.entity_id("HOT  DOGS") == vocab.surface_forms.index("hot dogs")
    assert vocab.entity_id("dog") == -1
    with pytest.raises(ValueError, match="'cat!'"):
        entities_build.vocab_from_names(["cat!"])


def test_save_load_round_trip(tmp_path):
    vocab = entities_build.vocab_from_names(["cat", "dog"])
    path = tmp_path / "sub" / "v.json"
    vocab.save(path)
    loaded = entities.load_entity_vocab(path)
    assert loaded == vocab and loaded.metadata == vocab.metadata
    assert [p.name for p in path.parent.iterdir()] == ["v.json"]


@pytest.mark.parametrize("doc, message", [
    ({"format": "other", "version": 1, "entities": {"cat": "cat"}}, "key 'format'"),
    ({"format": entities.FORMAT, "version": 9, "entities": {"cat": "cat"}}, "version 9"),
    ({"format": entities.FORMAT, "version": 1, "entities": {}}, "key 'entities'"),
    ({"format": entities.FORMAT, "version": 1, "entities": {"Cat": "cat", "cat": "cat"}}, "'Cat'"),
    ({"format": entities.FORMAT, "version": 1, "entities": {"cats": "cat"}}, "category 'cat'"),
])
def test_load_errors_name_the_fault(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as e:
        entities.load_entity_vocab(path)
    assert str(path) in str(e.value)


def test_load_missing_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        entities.load_entity_vocab(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        entities.load_entity_vocab(tmp_path / "x.json")


def test_read_categories_errors(tmp_path):
    bad = tmp_path / "lvis.json"
    bad.write_text(json.dumps([{"id": 1, "synonyms": []}]))
    with pytest.raises(ValueError, match="lacks a string 'name'"):
        entities_build.read_categories(None, bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        entities_build.read_categories(pathlib.Path("missing.json"), None)
