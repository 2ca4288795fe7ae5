"""COCO caption metrics exactly as pycocoevalcap computes them, and the paper's Cap_val.

BLEU-1..4, METEOR, ROUGE-L and CIDEr come from pycocoevalcap's own scorers on captions
tokenized by the Stanford PTBTokenizer (CoreNLP 3.4.1 jar shipped in pycocoevalcap),
lower-cased with punctuation removed. Only the tokenizer call is ours: it runs the same
jar with the same flags, but keeps its temporary file in the system temp folder (the
pycocoevalcap wrapper writes into its installed package folder, which may be
read-only). Java (a headless JRE, e.g. Debian `default-jre-headless`) is needed for the
tokenizer and for METEOR.

    Cap_val_B{n} = 100 * (Bleu_n + ROUGE_L + CIDEr) / 3     for n = 1..4

(the paper averages "BLEU, ROUGE-L and CIDEr" without saying which BLEU order).

CLI:
    python -m fisao_jax.eval.captions --captions hyp.jsonl --references captions_val2014.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Mapping, Sequence

from fisao_jax.eval import records as rec

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
# Line separators the Java tokenizer honours with -preserveLines; any of them inside a
# caption would shift every later caption by a line.
_LINE_BREAKS = ("\r\n", "\n", "\r", "\u2028", "\u2029", "\x0b", "\x0c", "\x85")


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "Java not found on PATH: the PTB tokenizer and METEOR need a Java runtime "
            "(e.g. apt-get install default-jre-headless)"
        )
    return java


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """PTB-tokenized, lower-cased texts with punctuation tokens removed, space-joined.

    Identical to pycocoevalcap's PTBTokenizer on each text (one Java call for all).
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    if not texts:
        return []
    jar = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    lines = []
    for text in texts:
        for brk in _LINE_BREAKS:
            text = text.replace(brk, " ")
        lines.append(text)
    fd, path = tempfile.mkstemp(prefix="ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("\n".join(lines).encode())
        cmd = [_java(), "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    out = proc.stdout.decode().split("\n")
    if len(out) < len(lines) or any(line.strip() for line in out[len(lines):]):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    punct = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in out[: len(lines)]]


def caption_scores(
    hypotheses: Mapping[object, str],
    references: Mapping[object, Sequence[str]],
    with_meteor: bool = True,
    meteor=None,
) -> dict:
    """pycocoevalcap metrics of one hypothesis per image against its references.

    hypotheses: {image_id: caption}; references: {image_id: [captions]} covering every
    hypothesis image. meteor: an open `pycocoevalcap.meteor.meteor.Meteor` to reuse (its
    Java start-up costs ~10 s); by default one is started and stopped here.
    Returns {"overall": {metric: value}, "per_image": {image_id:
    {metric: value}}, "tokenized": {image_id: {"hypothesis", "references"}}} with values
    as fractions (pycocoevalcap units) plus Cap_val_B1..B4 in percent in "overall".
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(hypotheses)
    if not ids:
        raise ValueError("no hypotheses to evaluate")
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no references for image(s) {missing[:10]}")
    flat_refs = [r for i in ids for r in references[i]]
    tokens = ptb_tokenize([hypotheses[i] for i in ids] + flat_refs)
    res = {i: [tokens[k]] for k, i in enumerate(ids)}
    gts, k = {}, len(ids)
    for i in ids:
        gts[i] = tokens[k : k + len(references[i])]
        k += len(references[i])

    overall: dict[str, float] = {}
    per_image: dict = {i: {} for i in ids}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        overall[f"Bleu_{n + 1}"] = float(bleu[n])
        for i, v in zip(ids, bleu_each[n]):
            per_image[i][f"Bleu_{n + 1}"] = float(v)
    scorers = [("ROUGE_L", Rouge()), ("CIDEr", Cider())]
    if with_meteor:
        _java()
        scorers.insert(0, ("METEOR", meteor if meteor is not None else Meteor()))
    for name, scorer in scorers:
        value, each = scorer.compute_score(gts, res)
        overall[name] = float(value)
        for i, v in zip(ids, each):
            per_image[i][name] = float(v)
    del scorers  # stops a METEOR Java process started here
    overall.update(cap_val(overall))
    tokenized = {i: {"hypothesis": res[i][0], "references": gts[i]} for i in ids}
    return {"overall": overall, "per_image": per_image, "tokenized": tokenized}


def cap_val(scores: Mapping[str, float]) -> dict[str, float]:
    """Cap_val_B{n} = 100 * mean(Bleu_n, ROUGE_L, CIDEr) for n = 1..4 (fractions in)."""
    return {
        f"Cap_val_B{n}": 100.0 * (scores[f"Bleu_{n}"] + scores["ROUGE_L"] + scores["CIDEr"]) / 3.0
        for n in range(1, 5)
    }


def _image_key(value):
    try:
        return rec.image_id_of(value)
    except ValueError:
        return str(value)


def load_references(path: str) -> dict:
    """{image_id: [captions]} from a COCO captions file, a {id: [captions]} JSON object,
    or JSONL/JSON array of {image_id, caption} (one line per reference)."""
    with rec.open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # JSON Lines
    if isinstance(data, dict):
        if "annotations" in data:
            items = [(a["image_id"], a["caption"]) for a in data["annotations"]]
        else:
            items = [(k, c) for k, caps in data.items() for c in (caps if isinstance(caps, list) else [caps])]
    else:
        records, problems = rec.read_records(path, ["image_id", "caption"])
        if problems:
            raise ValueError("; ".join(str(p) for p in problems[:5]))
        items = [(r.data["image_id"], r.data["caption"]) for r in records]
    refs: dict = {}
    for image_id, caption in items:
        if not isinstance(caption, str):
            raise ValueError(f"{path}: reference for image {image_id!r} is not a string")
        if caption.strip():
            refs.setdefault(_image_key(image_id), []).append(caption)
    return refs


def select_hypotheses(records: Sequence[rec.Record], references: Mapping, caption_key: str = "caption"):
    """({image_id: caption}, problems): skips empty, unknown-image and repeated captions."""
    hyps, problems = {}, []
    for r in records:
        image_id = _image_key(r.data["image_id"])
        caption = r.data[caption_key]
        if not isinstance(caption, str):
            problems.append(rec.Problem(r.where, "malformed_line", f"{caption_key!r} is not a string"))
        elif not caption.strip():
            problems.append(rec.Problem(r.where, "empty_caption", f"empty caption for image {image_id!r}"))
        elif image_id not in references:
            problems.append(rec.Problem(r.where, "unknown_image_id", f"image {image_id!r} has no references"))
        elif image_id in hyps:
            problems.append(rec.Problem(r.where, "duplicate_image_id", f"second caption for image {image_id!r}"))
        else:
            hyps[image_id] = caption
    return hyps, problems


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; prints overall metrics (+ Cap_val) as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m fisao_jax.eval.captions",
        description="COCO caption metrics (pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr) and Cap_val.",
    )
    parser.add_argument("--captions", required=True, help="JSONL (or JSON array) of {image_id, caption}")
    parser.add_argument("--references", required=True,
                        help="COCO captions JSON, {image_id: [captions]} JSON, or JSONL of {image_id, caption}")
    parser.add_argument("--caption_key", default="caption")
    parser.add_argument("--no_meteor", action="store_true", help="skip METEOR (the slow Java scorer)")
    parser.add_argument("--output", help="also write per-image scores and tokenized captions to this JSON file")
    parser.add_argument("--strict", action="store_true", help="fail instead of skipping bad input lines")
    args = parser.parse_args(argv)
    try:
        references = load_references(args.references)
        records, problems = rec.read_records(args.captions, ["image_id", args.caption_key])
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    hyps, more = select_hypotheses(records, references, args.caption_key)
    problems += more
    rec.report_problems(problems, args.strict)
    if not hyps:
        sys.exit(f"error: {args.captions}: no valid captions to evaluate")
    try:
        result = caption_scores(hyps, references, with_meteor=not args.no_meteor)
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    if args.output:
        rec.write_json_atomic(args.output, {**result, "per_image": {str(k): v for k, v in result["per_image"].items()},
                                            "tokenized": {str(k): v for k, v in result["tokenized"].items()}})
    summary = {**result["overall"], "num_captions": len(hyps), "skipped": rec.count_problems(problems)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
