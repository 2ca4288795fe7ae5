"""CHAIR: ground truth, mentions and scores against the reference fixtures and hand counts."""
import json
import pathlib
import subprocess
import sys

import pytest

from fisao_jax import packaged
from fisao_jax.eval import chair
from fisao_jax.eval.singularize import singularize
from fisao_jax.eval.word_tokenize import split_sentences, word_tokenize

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vocab():
    return chair.coco_vocab()  # the packaged reference table


@pytest.fixture(scope="module")
def fixture80(test_data):
    return json.loads((test_data / "chair" / "chair_gt_construction_fixture_coco80.json").read_text())


@pytest.fixture(scope="module")
def coco_categories():
    names = json.loads(packaged.path(packaged.COCO_CATEGORIES).read_text())
    return [{"id": i + 1, "name": n} for i, n in enumerate(names)]


def test_default_synonyms_are_the_packaged_table(vocab):
    assert chair.default_synonyms_path() == packaged.path(packaged.CHAIR_SYNONYMS)
    assert chair.coco_vocab(str(chair.default_synonyms_path())) == vocab


def test_rules_equal_documented_reference_rules(vocab):
    rules = json.loads(packaged.path(packaged.CHAIR_RULES).read_text())
    lines = packaged.path(packaged.CHAIR_SYNONYMS).read_text().splitlines()
    assert chair.parse_synonym_lines(lines) == rules["synonyms_lines_raw_split"]
    expected = {w: w for w in rules["coco_double_words"]}
    for a in rules["animal_words"]:
        expected[f"baby {a}"] = a
        expected[f"adult {a}"] = a
    for v in rules["vehicle_words"]:
        expected[f"passenger {v}"] = v
    expected.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    assert vocab.double_words == expected
    # quirks: the table's " motor bike" (leading space) never matches, and the double word
    # "motor bike" swallows "bike", so the phrase mentions nothing; iPhone never matches
    assert " motor bike" in vocab.node_of
    assert chair.caption_objects("a motor bike", vocab) == []
    assert chair.caption_objects("a bike", vocab) == [("bike", "bicycle")]
    assert chair.caption_objects("an iphone and a cheesecake", vocab) == []
    assert len(set(vocab.node_of.values())) == 80


@pytest.mark.parametrize("word, expected", [
    # hand-derived from Pattern 3.6's rule tables, quirks included
    ("dogs", "dog"), ("puppies", "puppy"), ("women", "woman"), ("policemen", "policeman"),
    ("people", "person"), ("children", "child"), ("oxen", "ox"), ("geese", "goose"),
    ("mice", "mouse"), ("knives", "knife"), ("wolves", "wolf"), ("buses", "bus"),
    ("boxes", "box"), ("glasses", "glass"), ("benches", "bench"), ("potatoes", "potato"),
    ("skis", "ski"), ("scissors", "scissors"), ("luggage", "luggage"), ("sheep", "sheep"),
    ("ties", "ty"),          # "^tie" in the -ie list never matches
    ("pies", "py"),
    ("bus", "bu"),           # no rule protects singular -us
    ("glass", "glas"),       # hence CHAIR's "wine glas" override
    ("ears", "ears"),        # suffix of uninflected "shears"
    ("ice", "ice"),          # suffix of uncountable "advice"
    ("is", "is"), ("a", "a"), ("on", "on"),
    ("doggies", "doggies"),  # the -ie list returns the plural unchanged
    ("cookies", "cookies"),
    ("your", "ymy"),         # irregular "our" -> "my" applied as a suffix
    ("shelves", "shelve"),   # irregular "helves" -> "helve" applied as a suffix
    ("spaghetti", "spaghettus"),  # ([octop|vir])i$ is a character class
    ("dogs'", "dog's"), ("mothers-in-law", "mother-in-law"),
])
def test_singularize_matches_pattern(word, expected):
    assert singularize(word) == expected


@pytest.mark.parametrize("text, expected", [
    ("a dog. the cat.", ["a", "dog", ".", "the", "cat", "."]),
    ("two dogs.\n\nthere is a cat", ["two", "dogs", ".", "there", "is", "a", "cat"]),
    ("mr. smith has a dog.", ["mr.", "smith", "has", "a", "dog", "."]),
    ("there are 2. cats here", ["there", "are", "2.", "cats", "here"]),
    ("he said \"a dog.\" then left", ["he", "said", "``", "a", "dog", ".", "''", "then", "left"]),
    ("cats... and dogs", ["cats", "...", "and", "dogs"]),
    ("what? a dog!", ["what", "?", "a", "dog", "!"]),
    ("a giraffe's head, tall.", ["a", "giraffe", "'s", "head", ",", "tall", "."]),
])
def test_word_tokenize_like_nltk(text, expected):
    assert word_tokenize(text) == expected


def test_split_sentences_moves_closing_bracket():
    assert split_sentences("a cat (on a mat.) the end") == ["a cat (on a mat.)", "the end"]


def test_caption_mentions_match_fixture(fixture80, vocab):
    n = 0
    for image in fixture80["images"]:
        for cap in image["captions"]:
            mentions = chair.caption_objects(cap["caption"], vocab)
            assert [w for w, _ in mentions] == cap["mscoco_words"], cap["caption"]
            assert [n for _, n in mentions] == cap["node_words"], cap["caption"]
            n += 1
    assert n == 401


def test_ground_truth_matches_fixture_80_of_80(fixture80, vocab, coco_categories):
    cat_id = {c["name"]: c["id"] for c in coco_categories}
    instances = [{"image_id": im["image_id"], "category_id": cat_id[c]}
                 for im in fixture80["images"] for c in im["instance_categories"]]
    captions = [{"image_id": im["image_id"], "caption": c["caption"]}
                for im in fixture80["images"] for c in im["captions"]]
    gt = chair.ground_truth_from_coco(instances, coco_categories, captions, vocab)
    matches = [gt[im["image_id"]] == set(im["expected_gt_objects"]) for im in fixture80["images"]]
    assert sum(matches) == 80


def test_ground_truth_from_raw_llava_boxes_file(test_data, fixture80, vocab, coco_categories):
    cat_id = {c["name"]: c["id"] for c in coco_categories}
    instances, captions = [], []
    for line in (test_data / "chair" / "llava_caps_boxes_coco2014_val_80.jsonl").read_text().splitlines():
        item = json.loads(line)
        instances += [{"image_id": int(item["id"]), "category_id": cat_id[i["category"]]} for i in item["instances"]]
        captions += [{"image_id": int(item["id"]), "caption": c} for c in item["captions"]]
    gt = chair.ground_truth_from_coco(instances, coco_categories, captions, vocab)
    assert {im["image_id"]: set(im["expected_gt_objects"]) for im in fixture80["images"]} == gt


def test_precomputed_gt_file_agrees_with_fixture(fixture80):
    gt = chair.load_gt_objects(chair.default_gt_objects_path())
    assert len(gt) == 123287
    for im in fixture80["images"]:
        assert gt[im["image_id"]] == set(im["expected_gt_objects"])


HAND_GT = {1: {"dog", "person", "bench"}, 2: {"cat"}}
HAND_CAPTIONS = [
    # tokens: a man walk two puppy . a cat sleep .  -> person, dog, cat(hallucinated); 10 tokens
    {"image_id": 1, "caption": "A man walks two puppies. A cat sleeps."},
    # "baby cat" -> cat; "seat" dropped because "toilet" is there; toilet hallucinated; 10 tokens
    {"image_id": 2, "caption": "A baby cat sits on the seat of the toilet."},
    # kitten -> cat; 3 tokens
    {"image_id": 2, "caption": "Two kittens."},
]


def test_chair_scores_hand_computed(vocab):
    out = chair.chair_scores(HAND_CAPTIONS, HAND_GT, vocab)
    assert out["CHAIRs"] == pytest.approx(100 * 2 / 3)
    assert out["CHAIRi"] == pytest.approx(100 * 2 / 6)
    assert out["Recall"] == pytest.approx(100 * (2 + 1 + 1) / (3 + 1 + 1))
    assert out["Len"] == pytest.approx((10 + 10 + 3) / 3)
    first, second, _ = out["sentences"]
    assert first["mentioned_objects"] == [["man", "person"], ["puppy", "dog"], ["cat", "cat"]]
    assert first["hallucinated_objects"] == [["cat", "cat"]]
    assert second["mentioned_objects"] == [["cat", "cat"], ["toilet", "toilet"]]
    assert second["metrics"] == {"CHAIRs": 1, "CHAIRi": 0.5, "Recall": 1.0, "Len": 10}


def test_custom_vocab_matches_plurals_and_two_word_names():
    vocab = chair.vocab_from_synonym_lines(["red cube, crimson block", "glass, tumbler"])
    assert chair.caption_objects("Two red cubes, a glass and tumblers.", vocab) == [
        ("red cube", "red cube"), ("glas", "glass"), ("tumbler", "glass")]
    assert chair.caption_objects("A crimson blocks pile.", vocab) == [("crimson block", "red cube")]


def test_ground_truth_rejects_unknown_category(vocab):
    with pytest.raises(ValueError, match="'spaceship' is not in the CHAIR synonym table"):
        chair.ground_truth_from_coco([{"image_id": 1, "category_id": 7}], [{"id": 7, "name": "spaceship"}], [], vocab)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fisao_jax.eval.chair", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_cli_scores_and_skips_bad_lines(tmp_path):
    caps = tmp_path / "caps.jsonl"
    lines = [json.dumps(c) for c in HAND_CAPTIONS]
    lines.insert(1, "{not json")                                        # line 2
    lines.append(json.dumps({"image_id": 2, "caption": "   "}))         # line 5
    lines.append(json.dumps({"image_id": 99, "caption": "A dog."}))     # line 6
    lines.append(json.dumps({"caption": "no id"}))                      # line 7
    caps.write_text("\n".join(lines) + "\n")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({str(k): sorted(v) for k, v in HAND_GT.items()}))
    details = tmp_path / "out" / "details.json"
    proc = _run_cli("--captions", caps, "--gt_objects", gt, "--output", details)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["CHAIRs"] == pytest.approx(100 * 2 / 3)
    assert out["CHAIRi"] == pytest.approx(100 * 2 / 6)
    assert out["Recall"] == pytest.approx(80.0)
    assert out["Len"] == pytest.approx(23 / 3)
    assert out["skipped"] == {"malformed_line": 1, "empty_caption": 1, "unknown_image_id": 1, "missing_key": 1}
    for where in (":2:", ":5:", ":6:", ":7:"):
        assert where in proc.stderr
    assert len(json.loads(details.read_text())["sentences"]) == 3

    synonyms = tmp_path / "synonyms.txt"  # --synonyms overrides the packaged table
    synonyms.write_text(packaged.path(packaged.CHAIR_SYNONYMS).read_text())
    strict = _run_cli("--captions", caps, "--gt_objects", gt, "--synonyms", synonyms, "--strict")
    assert strict.returncode == 2 and strict.stdout == ""


def test_cli_missing_gt_file_is_a_clear_error(tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps(HAND_CAPTIONS[0]) + "\n")
    proc = _run_cli("--captions", caps, "--gt_objects", tmp_path / "nope.json")
    assert proc.returncode != 0 and "nope.json: no such file" in proc.stderr
    proc = _run_cli("--captions", caps, "--synonyms", tmp_path / "nope.txt")
    assert proc.returncode != 0 and "nope.txt not found" in proc.stderr


def test_cli_defaults_to_packaged_coco2014_ground_truth(tmp_path, fixture80):
    image = fixture80["images"][0]
    assert image["expected_gt_objects"] == ["donut"]
    caps = tmp_path / "caps.jsonl"
    # tokens: a donut and a cat .  -> donut (correct), cat (hallucinated); 6 tokens
    caps.write_text(json.dumps({"image_id": image["image_id"], "caption": "A donut and a cat."}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "fisao_jax.eval.chair", "--captions", "caps.jsonl"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["CHAIRs"], out["CHAIRi"], out["Recall"], out["Len"]) == (100.0, 50.0, 100.0, 6.0)


def test_cli_builds_ground_truth_from_coco_annotation_folder(tmp_path, fixture80, coco_categories):
    cat_id = {c["name"]: c["id"] for c in coco_categories}
    images = fixture80["images"][:3]
    instances = [{"id": k, "image_id": im["image_id"], "category_id": cat_id[c]}
                 for k, (im, c) in enumerate((im, c) for im in images for c in im["instance_categories"])]
    refs = [{"id": k, "image_id": im["image_id"], "caption": c["caption"]}
            for k, (im, c) in enumerate((im, c) for im in images for c in im["captions"])]
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "instances_val2014.json").write_text(
        json.dumps({"annotations": instances, "categories": coco_categories}))
    (annotations / "captions_val2014.json").write_text(json.dumps({"annotations": refs}))
    assert images[0]["expected_gt_objects"] == ["donut"]
    caps = tmp_path / "caps.jsonl"
    # tokens: a donut and a cat .  -> donut (correct), cat (hallucinated); 6 tokens
    caps.write_text(json.dumps({"image_id": images[0]["image_id"], "caption": "A donut and a cat."}) + "\n")
    proc = _run_cli("--captions", caps, "--coco_annotations", annotations)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["CHAIRs"], out["CHAIRi"], out["Recall"], out["Len"]) == (100.0, 50.0, 100.0, 6.0)
    assert out["skipped"] == {}
