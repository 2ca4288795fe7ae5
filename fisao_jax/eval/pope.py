"""POPE (polling-based object probing) yes/no metrics with the two common answer parsers.

- "official": RUCAIBox/POPE evaluate.py == LLaVA llava/eval/eval_pope.py. Keep the text
  before the first ".", delete ",", split on single spaces; the answer is "no" if a
  token equals "No", "not" or "no" (case-sensitive), otherwise "yes". Every answer is
  parsed ("NO", "Nope" and "isn't" count as yes).
- "lmms": lmms-eval tasks/pope/utils.py. The answer, lower-cased and stripped, must be
  exactly "yes" or "no"; anything else scores 0 for accuracy and counts neither for
  precision nor recall.

Metrics (fractions in [0, 1], as both references print them): accuracy, precision,
recall, F1 with "yes" as the positive class, and yes_ratio = fraction of answers parsed
as "yes". lmms-eval's own `pope_yes_ratio` is the fraction of *ground-truth* "yes" labels;
it is reported as `lmms_eval_yes_ratio` for comparison with its tables.

The official COCO question files ship with the package: `--questions random` (or
`popular`, `adversarial`) reads fisao_jax/resources/pope/pope_coco_random.json.

CLI:
    python -m fisao_jax.eval.pope --questions random --answers ans.jsonl
    python -m fisao_jax.eval.pope --questions my_pope_questions.json --answers ans.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Iterable, Literal, Mapping, Sequence

from fisao_jax import packaged
from fisao_jax.eval import records as rec

Parser = Literal["official", "lmms"]
SPLIT_NAMES = ("adversarial", "popular", "random")


def parse_official(answer: str) -> str:
    """'yes' or 'no' by the official POPE / LLaVA rule (never unparsed)."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_lmms(answer: str) -> str | None:
    """'yes', 'no', or None when the answer is not exactly yes/no (lmms-eval rule)."""
    pred = answer.lower().strip()
    return pred if pred in ("yes", "no") else None


def parse_answer(answer: str, parser: Parser) -> str | None:
    """Parse one free-text answer with the named rule."""
    if parser == "official":
        return parse_official(answer)
    if parser == "lmms":
        return parse_lmms(answer)
    raise ValueError(f"unknown parser {parser!r} (expected 'official' or 'lmms')")


@dataclasses.dataclass(frozen=True)
class Counts:
    """Confusion counts with "yes" as positive; `unparsed` answers are neither yes nor no."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    unparsed: int = 0
    label_yes: int = 0

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn + self.unparsed


def count(predictions: Iterable[str | None], labels: Iterable[str]) -> Counts:
    """Confusion counts of parsed predictions against "yes"/"no" labels."""
    c = dict(tp=0, fp=0, tn=0, fn=0, unparsed=0, label_yes=0)
    for pred, label in zip(predictions, labels, strict=True):
        c["label_yes"] += label == "yes"
        if pred is None:
            c["unparsed"] += 1
        else:
            key = ("t" if pred == label else "f") + ("p" if pred == "yes" else "n")
            c[key] += 1
    return Counts(**c)


def metrics(c: Counts) -> dict[str, float | int]:
    """accuracy, precision, recall, f1, yes_ratio (fractions) and counts; 0 where undefined."""
    total = c.total
    precision = c.tp / (c.tp + c.fp) if c.tp + c.fp else 0.0
    recall = c.tp / (c.tp + c.fn) if c.tp + c.fn else 0.0
    return {
        "accuracy": (c.tp + c.tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (c.tp + c.fp) / total if total else 0.0,
        "lmms_eval_yes_ratio": c.label_yes / total if total else 0.0,
        "num_questions": total,
        "unparsed": c.unparsed,
        "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn,
    }


METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "lmms_eval_yes_ratio")


def pope_scores(
    questions: Sequence[Mapping], answers: Mapping[object, str], parser: Parser = "official"
) -> dict[str, dict]:
    """Metrics per split: {split: metrics(...)}.

    questions: [{"question_id", "label", optional "split"}]; labels "yes"/"no".
    answers: {question_id: answer text}; questions without an answer are left out.
    """
    by_split: dict[str, tuple[list, list]] = {}
    for q in questions:
        if q["question_id"] not in answers:
            continue
        preds, labels = by_split.setdefault(q.get("split") or "all", ([], []))
        preds.append(parse_answer(answers[q["question_id"]], parser))
        labels.append(q["label"])
    return {split: metrics(count(p, l)) for split, (p, l) in by_split.items()}


def mean_over_splits(per_split: Mapping[str, Mapping]) -> dict[str, float]:
    """Unweighted mean of each metric over splits (how POPE tables average the 3 splits)."""
    return {k: sum(m[k] for m in per_split.values()) / len(per_split) for k in METRIC_KEYS}


def split_name(path: str) -> str:
    """'random' for pope_coco_random.json / coco_pope_random.jsonl, else the file stem."""
    stem = pathlib.Path(path).name.split(".")[0]
    last = stem.rsplit("_", 1)[-1]
    return last if last in SPLIT_NAMES else stem


def questions_path(name: str) -> str:
    """The packaged COCO question file for a split name ('random', 'popular', 'adversarial'),
    else `name` itself (a path; write `./random` for a file that is called like a split)."""
    return str(packaged.path(packaged.pope_coco(name))) if name in packaged.POPE_SPLITS else name


def load_questions(path: str) -> tuple[list[dict], list[rec.Problem]]:
    """Question records of an official POPE file; bad labels are skipped as problems."""
    records, problems = rec.read_records(path, ["question_id", "label"])
    questions, seen = [], set()
    default_split = split_name(path)
    for r in records:
        label = str(r.data["label"]).strip().lower()
        if label not in ("yes", "no"):
            problems.append(rec.Problem(r.where, "bad_label", f"label {r.data['label']!r} is not yes/no"))
        elif r.data["question_id"] in seen:
            qid = r.data["question_id"]
            problems.append(rec.Problem(r.where, "duplicate_question_id", f"question_id {qid!r} repeated"))
        else:
            seen.add(r.data["question_id"])
            split = r.data.get("category") or default_split
            questions.append({"question_id": r.data["question_id"], "label": label, "split": split})
    return questions, problems


def load_answers(path: str, question_ids: set) -> tuple[dict, list[rec.Problem]]:
    """{question_id: answer} from JSONL with `question_id` and `answer` (or LLaVA's `text`)."""
    records, problems = rec.read_records(path, ["question_id"])
    answers = {}
    for r in records:
        qid = r.data["question_id"]
        text = r.data.get("answer", r.data.get("text"))
        if not isinstance(text, str):
            problems.append(rec.Problem(r.where, "malformed_line", "no string 'answer' (or 'text')"))
        elif qid not in question_ids:
            problems.append(rec.Problem(r.where, "unknown_question_id", f"question_id {qid!r} is not in the questions"))
        elif qid in answers:
            problems.append(rec.Problem(r.where, "duplicate_answer", f"second answer for question_id {qid!r}"))
        else:
            answers[qid] = text
    return answers, problems


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; prints per-split metrics as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m fisao_jax.eval.pope",
        description="POPE accuracy/precision/recall/F1/yes-ratio per split (fractions).",
    )
    parser.add_argument("--questions", nargs="+", required=True,
                        help="POPE question files (JSONL: question_id, image, text, label), or the split "
                             "names random / popular / adversarial for the packaged official COCO files")
    parser.add_argument("--answers", nargs="+", required=True,
                        help="answer JSONL files (question_id, answer), one per questions file, same order")
    parser.add_argument("--parser", choices=("official", "lmms"), default="official",
                        help="answer parsing rule: official POPE/LLaVA, or lmms-eval exact match")
    parser.add_argument("--strict", action="store_true", help="fail instead of skipping bad input lines")
    args = parser.parse_args(argv)
    if len(args.questions) != len(args.answers):
        parser.error("give one --answers file per --questions file")

    output: dict = {"parser": args.parser, "splits": {}}
    problems: list[rec.Problem] = []
    try:
        for q_name, a_path in zip(args.questions, args.answers):
            q_path = questions_path(q_name)
            questions, q_problems = load_questions(q_path)
            answers, a_problems = load_answers(a_path, {q["question_id"] for q in questions})
            problems += q_problems + a_problems
            missing = [q for q in questions if q["question_id"] not in answers]
            problems += [rec.Problem(a_path, "missing_answer", f"no answer for question_id {q['question_id']!r}")
                         for q in missing]
            scores = pope_scores(questions, answers, args.parser)
            for split, values in scores.items():
                if split in output["splits"]:
                    sys.exit(f"error: split {split!r} given twice ({q_path})")
                output["splits"][split] = values
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    rec.report_problems(problems, args.strict)
    if not output["splits"]:
        sys.exit("error: no answered questions to evaluate")
    if len(output["splits"]) > 1:
        output["mean"] = mean_over_splits(output["splits"])
    output["skipped"] = rec.count_problems(problems)
    print(json.dumps(output, indent=1))


if __name__ == "__main__":
    main()
