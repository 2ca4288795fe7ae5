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


def test_builder_is_deterministic_and_matches_packaged_file(built):
    again = entities_build.build_entity_vocab(entities_build.read_categories(COCO, LVIS))
    assert again.to_json() == built.to_json()
    packaged = json.loads(PACKAGED.read_text())
    assert packaged["entities"] == built.as_dict()
    metadata = dict(packaged["metadata"])
    assert metadata.pop("command") == ("python tools/build_entities.py "
                                       "--out fisao_jax/resources/entities_v1.json")
    metadata.pop("sources")
    assert metadata == json.loads(json.dumps(built.metadata))


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
    assert outputs[0]["entities"] == json.loads(PACKAGED.read_text())["entities"]


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
