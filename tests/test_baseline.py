"""Baseline scores against hand-computed numbers; JSON round trip; the histogram PNGs."""
import json

import numpy as np
import pytest
from PIL import Image

from fisao_jax.rewards.baseline import BaselineScores, plot_reward_shift, plot_score_histograms

# Correct mentions 10, 20, 30, 40 and hallucinated 5, 15. Sorted: 5 10 15 20 30 40 (n = 6);
# linear percentile p sits at rank p/100 * 5.
SCORES = [10.0, 5.0, 20.0, 30.0, 15.0, 40.0]
HALLUCINATED = [False, True, False, False, True, False]


def test_from_mentions_hand_computed():
    b = BaselineScores.from_mentions(SCORES, HALLUCINATED)
    assert b.s_c == pytest.approx(25.0)  # (10 + 20 + 30 + 40) / 4
    assert b.s_h == pytest.approx(10.0)  # (5 + 15) / 2
    assert b.s_min == pytest.approx(5.25)  # rank 0.05: 5 + 0.05 * (10 - 5)
    assert b.s_max == pytest.approx(39.5)  # rank 4.95: 30 + 0.95 * (40 - 30)
    assert (b.num_correct, b.num_hallucinated) == (4, 2)
    other = BaselineScores.from_mentions(SCORES, [int(h) for h in HALLUCINATED], 50, 100)
    assert (other.s_min, other.s_max) == (pytest.approx(17.5), pytest.approx(40.0))
    rp = b.reward_params(10.0)
    assert [float(x) for x in (rp.margin, rp.s_c, rp.s_h, rp.s_min, rp.s_max)] == pytest.approx([10.0, b.s_c, b.s_h, b.s_min, b.s_max])


@pytest.mark.parametrize("scores, labels, kwargs, message", [
    ([1.0, 2.0], [True, True], {}, "no correct mentions"),
    ([1.0, 2.0], [False, False], {}, "no hallucinated mentions"),
    ([1.0, 2.0], [False], {}, "differ in length"),
    ([1.0, float("nan")], [False, True], {}, "score 1 is not finite"),
    ([1.0, 2.0], [False, True], {"low_pct": 60, "high_pct": 40}, "low_pct < high_pct"),
    ([3.0, 3.0, 3.0], [False, True, False], {}, "percentiles of the scores are equal"),
    ([1.0, 2.0], [0, 2], {}, "booleans"),
])
def test_from_mentions_errors(scores, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BaselineScores.from_mentions(scores, labels, **kwargs)


def test_save_load_round_trip(tmp_path):
    b = BaselineScores.from_mentions(SCORES, HALLUCINATED)
    path = tmp_path / "run" / "baseline.json"
    b.save(path)
    assert BaselineScores.load(path) == b
    assert json.loads(path.read_text())["s_c"] == 25.0
    assert [p.name for p in path.parent.iterdir()] == ["baseline.json"]


@pytest.mark.parametrize("doc, message", [
    ({"s_c": 1.0, "s_h": 0.0, "s_min": 0.0}, "missing key 's_max'"),
    ({"s_c": "1", "s_h": 0.0, "s_min": 0.0, "s_max": 2.0}, "key 's_c' must be a finite number"),
    ({"s_c": 1.0, "s_h": 0.0, "s_min": 0.0, "s_max": 2.0, "extra": 1}, "unknown keys"),
    ({"s_c": 1.0, "s_h": 0.0, "s_min": 2.0, "s_max": 2.0}, "s_max .* must exceed s_min"),
    ([1, 2], "expected a JSON object"),
])
def test_load_errors_name_file_and_key(tmp_path, doc, message):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as e:
        BaselineScores.load(path)
    assert str(path) in str(e.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        BaselineScores.load(tmp_path / "absent.json")


def _has_color(path, rgb, tol=12):
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    return bool((np.abs(pixels - rgb).max(axis=1) <= tol).any())


def test_score_histograms_png(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(26, 2, 400), rng.normal(21, 2, 200)])
    labels = np.r_[np.zeros(400, bool), np.ones(200, bool)]
    path = tmp_path / "fig1.png"
    plot_score_histograms(scores, labels, path, BaselineScores.from_mentions(scores, labels))
    assert Image.open(path).format == "PNG"
    # Half-transparent tab:blue and tab:red bars over white.
    assert _has_color(path, (143, 187, 217)) and _has_color(path, (234, 147, 147))
    only_correct = tmp_path / "correct.png"
    plot_score_histograms(scores[:400], labels[:400], only_correct)
    assert not _has_color(only_correct, (234, 147, 147))


def test_reward_shift_png(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "fig4.png"
    plot_reward_shift(rng.normal(-1, 3, 300), rng.normal(2, 3, 300), path)
    assert Image.open(path).size[0] > 500
    with pytest.raises(ValueError, match="before and after"):
        plot_reward_shift([], [1.0], tmp_path / "x.png")
