"""COCO caption metrics against the pycocoevalcap fixtures and the Java PTBTokenizer pairs."""
import gzip
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from fisao_jax.eval import captions

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_METEOR = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")


@pytest.fixture(scope="module")
def fixtures(test_data):
    data = json.loads((test_data / "captions" / "coco80_caption_metric_fixtures.json").read_text())
    return {f["name"]: f for f in data["fixtures"]}


def _inputs(fixture):
    hyps = {it["image_id"]: it["hypothesis"] for it in fixture["items"]}
    refs = {it["image_id"]: it["references"] for it in fixture["items"]}
    return hyps, refs


@pytest.mark.parametrize("name", ["leave_one_out_caption0_vs_captions1to4", "shifted_caption0_of_next_image"])
def test_bleu_rouge_cider_and_tokens_equal_fixture(fixtures, name):
    fixture = fixtures[name]
    out = captions.caption_scores(*_inputs(fixture), with_meteor=False)
    for key in NO_METEOR:
        assert out["overall"][key] == pytest.approx(fixture["overall"][key], abs=1e-6), key
    for item in fixture["items"]:
        tokenized = out["tokenized"][item["image_id"]]
        assert tokenized["hypothesis"] == item["hypothesis_ptb"]
        assert tokenized["references"] == item["references_ptb"]
        for key in NO_METEOR:
            assert out["per_image"][item["image_id"]][key] == pytest.approx(item["scores"][key], abs=1e-6)


def test_meteor_equals_fixture(fixtures):  # ~10 s: METEOR's JVM loads its paraphrase table
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        for fixture in fixtures.values():
            out = captions.caption_scores(*_inputs(fixture), meteor=meteor)
            assert out["overall"]["METEOR"] == pytest.approx(fixture["overall"]["METEOR"], abs=1e-6)
            for item in fixture["items"]:
                got = out["per_image"][item["image_id"]]["METEOR"]
                assert got == pytest.approx(item["scores"]["METEOR"], abs=1e-6)
            assert out["overall"]["Bleu_4"] == pytest.approx(fixture["overall"]["Bleu_4"], abs=1e-6)
    finally:
        del meteor


def test_cap_val_by_hand(fixtures):
    overall = fixtures["leave_one_out_caption0_vs_captions1to4"]["overall"]
    cv = captions.cap_val(overall)
    # (Bleu_n + ROUGE_L + CIDEr) / 3 * 100 with the fixture's numbers
    assert cv["Cap_val_B1"] == pytest.approx((0.6326530612237303 + 0.44147384231183906 + 0.9532002086572927) / 3 * 100)
    assert cv["Cap_val_B4"] == pytest.approx((0.16551976034727686 + 0.44147384231183906 + 0.9532002086572927) / 3 * 100)
    scores = {"Bleu_1": 0.5, "Bleu_2": 0.4, "Bleu_3": 0.3, "Bleu_4": 0.2, "ROUGE_L": 0.5, "CIDEr": 1.1}
    assert captions.cap_val(scores) == \
        pytest.approx({"Cap_val_B1": 70.0, "Cap_val_B2": 200 / 3, "Cap_val_B3": 190 / 3, "Cap_val_B4": 60.0})


def test_ptb_tokenizer_equals_java_reference_pairs(test_data):
    with gzip.open(test_data / "captions" / "ptbtokenizer_reference_pairs.json.gz", "rt") as f:
        pairs = json.load(f)
    assert len(pairs) == 27432
    tokens = captions.ptb_tokenize([p["input"] for p in pairs])
    mismatches = [(p["input"], t, p["ptb"]) for p, t in zip(pairs, tokens) if t != p["ptb"]]
    assert mismatches == []


def test_line_breaks_inside_a_caption_do_not_shift_later_captions():
    assert captions.ptb_tokenize(["a dog\r\non a mat.", "two cats\u2028here", "The end."]) == [
        "a dog on a mat", "two cats here", "the end"]


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fisao_jax.eval.captions", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_cli_equals_fixture_and_skips_bad_lines(tmp_path, fixtures):
    fixture = fixtures["leave_one_out_caption0_vs_captions1to4"]
    refs = tmp_path / "refs.json"  # COCO captions format
    refs.write_text(json.dumps({"annotations": [
        {"image_id": it["image_id"], "id": k, "caption": r}
        for k, it in enumerate(fixture["items"]) for r in it["references"]]}))
    lines = [json.dumps({"image_id": it["image_id"], "caption": it["hypothesis"]}) for it in fixture["items"]]
    lines[5:5] = ["{broken",
                  json.dumps({"image_id": 1, "caption": "a cat"}),
                  json.dumps({"image_id": 2, "caption": ""})]
    lines.append(json.dumps({"image_id": fixture["items"][0]["image_id"], "caption": "again"}))
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(lines) + "\n")
    proc = _run_cli("--captions", caps, "--references", refs, "--no_meteor", "--output", tmp_path / "per_image.json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in NO_METEOR:
        assert out[key] == pytest.approx(fixture["overall"][key], abs=1e-6), key
    assert out["num_captions"] == 80
    assert out["skipped"] == {"malformed_line": 1, "unknown_image_id": 1, "empty_caption": 1, "duplicate_image_id": 1}
    for where in ("caps.jsonl:6:", "caps.jsonl:7:", "caps.jsonl:8:", "caps.jsonl:84:"):
        assert where in proc.stderr
    assert "Cap_val_B4" in out and "METEOR" not in out
    assert len(json.loads((tmp_path / "per_image.json").read_text())["per_image"]) == 80
