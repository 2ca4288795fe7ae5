"""POPE: answer parsing against the published cases, metrics against hand counts."""
import json
import pathlib
import subprocess
import sys

import pytest

from fisao_jax import packaged
from fisao_jax.eval import pope

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_parsers_match_every_published_case(test_data):
    cases = json.loads((test_data / "pope" / "pope_answer_parsing_cases.json").read_text())["cases"]
    assert len(cases) == 29
    for case in cases:
        assert pope.parse_official(case["answer"]) == case["official_pope_and_llava_eval_pope"], case
        assert pope.parse_lmms(case["answer"]) == case["lmms_eval_exact_match"], case


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_official_question_files_load_cleanly(split):
    path = pope.questions_path(split)  # the packaged file
    assert path == str(packaged.path(packaged.pope_coco(split)))
    questions, problems = pope.load_questions(path)
    assert problems == []
    assert len(questions) == 3000
    assert sum(q["label"] == "yes" for q in questions) == 1500
    assert {q["split"] for q in questions} == {split}


# (label, answer, official parse, lmms parse)
HAND = [
    ("yes", "Yes, there is a dog.", "yes", None),
    ("yes", "No", "no", "no"),
    ("no", "no", "no", "no"),
    ("no", "Yes", "yes", "yes"),
    ("yes", "yes", "yes", "yes"),
    ("no", "There is not a car.", "no", None),
    ("yes", "NO", "yes", "no"),
    ("no", "No.", "no", None),
    ("no", "Maybe", "yes", None),
]


def _write_hand_files(folder: pathlib.Path, name: str):
    questions = folder / f"pope_coco_{name}.json"
    answers = folder / f"answers_{name}.jsonl"
    questions.write_text("".join(
        json.dumps({"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg", "text": "Is there a dog?",
                    "label": label}) + "\n"
        for i, (label, *_) in enumerate(HAND, 1)))
    answers.write_text("".join(
        json.dumps({"question_id": i, "answer": ans}) + "\n" for i, (_, ans, *_) in enumerate(HAND, 1)))
    return questions, answers


def test_hand_file_parses_as_tabulated():
    for label, answer, official, lmms in HAND:
        assert pope.parse_official(answer) == official
        assert pope.parse_lmms(answer) == lmms


def test_metrics_official_parser_by_hand():
    # preds y n n y y n y n y  vs labels y y n n y n y n n: TP 3 (1,5,7) FN 1 (2) TN 3 (3,6,8) FP 2 (4,9)
    questions = [{"question_id": i, "label": label} for i, (label, *_) in enumerate(HAND, 1)]
    answers = {i: ans for i, (_, ans, *_) in enumerate(HAND, 1)}
    m = pope.pope_scores(questions, answers, "official")["all"]
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["unparsed"]) == (3, 1, 3, 2, 0)
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["yes_ratio"] == pytest.approx(5 / 9)


def test_metrics_lmms_parser_by_hand():
    # parsed: q2 no/yes FN, q3 no/no TN, q4 yes/no FP, q5 yes/yes TP, q7 no/yes FN; 4 unparsed
    questions = [{"question_id": i, "label": label} for i, (label, *_) in enumerate(HAND, 1)]
    answers = {i: ans for i, (_, ans, *_) in enumerate(HAND, 1)}
    m = pope.pope_scores(questions, answers, "lmms")["all"]
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["unparsed"]) == (1, 2, 1, 1, 4)
    assert m["accuracy"] == pytest.approx(2 / 9)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4)
    assert m["yes_ratio"] == pytest.approx(2 / 9)
    assert m["lmms_eval_yes_ratio"] == pytest.approx(4 / 9)  # lmms-eval counts ground-truth yes


def test_undefined_ratios_are_zero():
    m = pope.metrics(pope.count(["no", "no"], ["no", "no"]))
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fisao_jax.eval.pope", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)


def test_cli_two_splits_with_bad_lines(tmp_path):
    q_random, a_random = _write_hand_files(tmp_path, "random")
    q_popular, a_popular = _write_hand_files(tmp_path, "popular")
    # popular: drop the answer to question 9 (label no, "Maybe" -> FP) and add bad lines
    lines = a_popular.read_text().splitlines()[:8]
    lines += ["not json",
              json.dumps({"question_id": 77, "answer": "yes"}),
              json.dumps({"question_id": 3, "answer": "yes"})]
    a_popular.write_text("\n".join(lines) + "\n")
    proc = _run_cli("--questions", q_random, q_popular, "--answers", a_random, a_popular)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["parser"] == "official"
    assert out["splits"]["random"]["accuracy"] == pytest.approx(6 / 9)
    popular = out["splits"]["popular"]  # TP 3 FN 1 TN 3 FP 1 over 8 answered
    assert popular["accuracy"] == pytest.approx(6 / 8)
    assert popular["precision"] == pytest.approx(3 / 4)
    assert popular["yes_ratio"] == pytest.approx(4 / 8)
    assert out["mean"]["accuracy"] == pytest.approx((6 / 9 + 6 / 8) / 2)
    assert out["skipped"] == {"malformed_line": 1, "unknown_question_id": 1, "duplicate_answer": 1, "missing_answer": 1}
    assert "answers_popular.jsonl:9:" in proc.stderr and "answers_popular.jsonl:10:" in proc.stderr

    lmms = _run_cli("--questions", q_random, "--answers", a_random, "--parser", "lmms")
    assert json.loads(lmms.stdout)["splits"]["random"]["accuracy"] == pytest.approx(2 / 9)

    strict = _run_cli("--questions", q_popular, "--answers", a_popular, "--strict")
    assert strict.returncode == 2


def test_cli_rejects_unpaired_files(tmp_path):
    q, a = _write_hand_files(tmp_path, "random")
    proc = _run_cli("--questions", q, q, "--answers", a)
    assert proc.returncode == 2 and "one --answers file per --questions file" in proc.stderr


def test_cli_reads_packaged_questions_by_split_name(tmp_path):
    ids = [q["question_id"] for q in pope.load_questions(pope.questions_path("adversarial"))[0]]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"question_id": i, "text": "Yes"}) + "\n" for i in ids))
    proc = subprocess.run([sys.executable, "-m", "fisao_jax.eval.pope", "--questions", "adversarial",
                           "--answers", "answers.jsonl"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["splits"]["adversarial"]  # all "yes" on 1500 yes + 1500 no
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
