"""CHAIR object-hallucination metric, computed as the reference implementation does.

Reference: Rohrbach et al. 2018, LisaAnne/Hallucination utils/chair.py, with the Recall
and Len additions of the widely used Maxlinn/OPERA variants. For each caption:

1. lower-case, `nltk.word_tokenize` (`word_tokenize.py`), Pattern `singularize` every
   token (`singularize.py`, quirks included);
2. merge two-token phrases of the double-word table (`"teddy bear"`, `"baby dog" -> dog`,
   `"passenger jet" -> jet`, `"toilet seat" -> toilet`, `"wine glas" -> wine glass`);
3. if both "toilet" and "seat" remain, drop every "seat" (a toilet seat is no chair);
4. keep tokens that are synonyms; map each to its node word (first word of its line).

A mention is hallucinated when its node word is not among the image's ground-truth
objects (COCO instance categories plus node words of the reference captions).

    CHAIRs = 100 * #captions with a hallucination / #captions
    CHAIRi = 100 * #hallucinated mentions / #mentions
    Recall = 100 * sum_c |correct node words of c| / sum_c |ground-truth objects of c|
    Len    = mean number of tokens per caption after step 2 (OPERA's "Len")

CLI (ground truth: the packaged COCO 2014 train+val objects unless --gt_objects or
--coco_annotations is given; synonyms: the packaged table unless --synonyms is given):
    python -m fisao_jax.eval.chair --captions caps.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
from typing import Collection, Iterable, Mapping, Sequence

from tqdm import tqdm

from fisao_jax import packaged
from fisao_jax.eval import records as rec
from fisao_jax.eval.singularize import singularize
from fisao_jax.eval.word_tokenize import word_tokenize

# Hard-coded rules of the reference implementation, as the code has them; the same rules as data in
# fisao_jax/resources/chair/chair_rules.json (the tests check that they agree).
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light",
    "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter",
    "suit case", "sports ball", "baseball bat", "baseball glove", "tennis racket",
    "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear",
    "home plate", "train track",
)
# "baby bird" / "adult bird" must not fire "person" for "baby"/"adult".
ANIMAL_WORDS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
)
# "passenger jet" must not fire "person" for "passenger".
VEHICLE_WORDS = ("jet", "train")
COCO_OVERRIDES = (("bow tie", "tie"), ("toilet seat", "toilet"), ("wine glas", "wine glass"))


@dataclasses.dataclass(frozen=True)
class ChairVocab:
    """CHAIR's object vocabulary.

    node_of: synonym -> node word (object category), e.g. "puppy" -> "dog".
    double_words: two singularised tokens joined by a space -> the word they become.
    """

    node_of: Mapping[str, str]
    double_words: Mapping[str, str]


def parse_synonym_lines(lines: Iterable[str]) -> list[list[str]]:
    """Split synonyms.txt lines as the reference does: strip, then split on ", ".

    Entries keep inner spaces, so the reference file's " motor bike" and " cheesecake"
    (after a double space) never match anything, exactly as in the reference.
    """
    return [line.strip().split(", ") for line in lines if line.strip()]


def _node_map(groups: Sequence[Sequence[str]]) -> dict[str, str]:
    node_of: dict[str, str] = {}
    for group in groups:
        for word in group:
            node_of[word] = group[0]  # a word listed twice keeps its last line, as in the reference
    return node_of


def coco_vocab_from_lines(lines: Iterable[str]) -> ChairVocab:
    """Vocabulary of the reference COCO CHAIR from the lines of its synonyms.txt."""
    double_words = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        double_words[f"baby {animal}"] = animal
        double_words[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        double_words[f"passenger {vehicle}"] = vehicle
    double_words.update(COCO_OVERRIDES)
    return ChairVocab(node_of=_node_map(parse_synonym_lines(lines)), double_words=double_words)


def vocab_from_synonym_lines(
    lines: Iterable[str], double_words: Mapping[str, str] | None = None
) -> ChairVocab:
    """Vocabulary for a custom object world (same line format as synonyms.txt).

    Unlike the reference table, every synonym is also matched in its Pattern-singular
    form ("glass" is tokenised to "glas"), and every two-word synonym is merged as a
    double word unless `double_words` is given. Synonyms of three or more words cannot
    match (CHAIR merges token pairs only).
    """
    groups = parse_synonym_lines(lines)
    node_of = _node_map(groups)
    for group in groups:
        for word in group:
            node_of.setdefault(" ".join(singularize(w) for w in word.split(" ")), group[0])
    if double_words is None:
        double_words = {}
        for word in list(node_of):
            parts = word.split(" ")
            if len(parts) == 2 and all(parts):
                double_words[" ".join(singularize(p) for p in parts)] = word
    return ChairVocab(node_of=node_of, double_words=dict(double_words))


def default_synonyms_path() -> pathlib.Path:
    """The reference synonym table shipped with the package (fisao_jax/resources/chair/synonyms.txt)."""
    return packaged.path(packaged.CHAIR_SYNONYMS)


def default_gt_objects_path() -> pathlib.Path:
    """Ground-truth objects of every COCO 2014 train+val image, shipped with the package."""
    return packaged.path(packaged.CHAIR_GT_COCO2014)


@functools.lru_cache(maxsize=8)
def coco_vocab(synonyms_path: str | None = None) -> ChairVocab:
    """Reference COCO vocabulary read from `synonyms_path` (default: `default_synonyms_path()`)."""
    path = pathlib.Path(synonyms_path) if synonyms_path else default_synonyms_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"CHAIR synonyms file {path} not found (pass an existing file as --synonyms / "
            "synonyms_path, or leave it out for the packaged table)"
        )
    return coco_vocab_from_lines(path.read_text(encoding="utf-8").splitlines())


@dataclasses.dataclass(frozen=True)
class CaptionWords:
    """Result of CHAIR's caption processing.

    words: tokens after singularisation and double-word merging (their count is `Len`).
    mentions: (word, node word) of each object mention, in caption order.
    positions: index in `words` of each mention.
    """

    words: tuple[str, ...]
    mentions: tuple[tuple[str, str], ...]
    positions: tuple[int, ...]


def caption_words(caption: str, vocab: ChairVocab | None = None) -> CaptionWords:
    """Tokens and object mentions of `caption` (steps 1-4 of the module docstring)."""
    vocab = vocab or coco_vocab()
    tokens = [singularize(t) for t in word_tokenize(caption.lower())]
    words: list[str] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i : i + 2])
        if pair in vocab.double_words:
            words.append(vocab.double_words[pair])
            i += 2
        else:
            words.append(tokens[i])
            i += 1
    drop_seat = "toilet" in words and "seat" in words
    mentions, positions = [], []
    for pos, word in enumerate(words):
        if word in vocab.node_of and not (drop_seat and word == "seat"):
            mentions.append((word, vocab.node_of[word]))
            positions.append(pos)
    return CaptionWords(tuple(words), tuple(mentions), tuple(positions))


def caption_objects(caption: str, vocab: ChairVocab | None = None) -> list[tuple[str, str]]:
    """Object mentions of `caption` as (word, node word) pairs, e.g. [("puppy", "dog")]."""
    return list(caption_words(caption, vocab).mentions)


def ground_truth_from_coco(
    instances: Iterable[Mapping],
    categories: Iterable[Mapping],
    captions: Iterable[Mapping],
    vocab: ChairVocab | None = None,
) -> dict[int, set[str]]:
    """Ground-truth objects per image: instance categories + reference-caption objects.

    instances: COCO instance annotations (`image_id`, `category_id`).
    categories: COCO categories (`id`, `name`); names must be synonyms in `vocab`.
    captions: COCO caption annotations (`image_id`, `caption`).
    Returns {image_id: set of node words}.
    """
    vocab = vocab or coco_vocab()
    name_of = {c["id"]: c["name"] for c in categories}
    gt: dict[int, set[str]] = {}
    for ann in instances:
        name = name_of.get(ann["category_id"])
        if name is None:
            raise ValueError(f"instance annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        if name not in vocab.node_of:
            raise ValueError(f"category {name!r} is not in the CHAIR synonym table")
        gt.setdefault(int(ann["image_id"]), set()).add(vocab.node_of[name])
    for ann in captions:
        nodes = gt.setdefault(int(ann["image_id"]), set())
        nodes.update(node for _, node in caption_words(ann["caption"], vocab).mentions)
    return gt


def ground_truth_from_coco_dir(
    annotation_dir: str | os.PathLike, vocab: ChairVocab | None = None
) -> dict[int, set[str]]:
    """Ground truth from a COCO 2014 annotations folder (instances_/captions_{train,val}2014.json).

    Like the reference, uses train and val together; a missing split is skipped, but at
    least one instances and one captions file must exist.
    """
    folder = pathlib.Path(annotation_dir)
    inst_files = [folder / f"instances_{s}2014.json" for s in ("train", "val")]
    cap_files = [folder / f"captions_{s}2014.json" for s in ("train", "val")]
    inst_files = [p for p in inst_files if p.is_file()]
    cap_files = [p for p in cap_files if p.is_file()]
    if not inst_files or not cap_files:
        raise FileNotFoundError(f"{folder}: need instances_{{train,val}}2014.json and captions_{{train,val}}2014.json")
    instances, categories, captions = [], [], []
    for path in tqdm(inst_files + cap_files, desc="loading COCO annotations"):
        data = rec.load_json(path)
        if path in inst_files:
            instances += data["annotations"]
            categories = data["categories"]
        else:
            captions += data["annotations"]
    return ground_truth_from_coco(instances, categories, tqdm(captions, desc="caption objects"), vocab)


def load_gt_objects(path: str | os.PathLike) -> dict[int, set[str]]:
    """Precomputed ground truth: JSON(.gz) object {image_id: [node words]}."""
    data = rec.load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{image_id: [objects]}}")
    gt = {}
    for key, objects in data.items():
        try:
            gt[rec.image_id_of(key)] = set(objects)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: entry {key!r}: {err}") from None
    return gt


def chair_scores(
    captions: Sequence[Mapping],
    gt_objects: Mapping[int, Collection[str]],
    vocab: ChairVocab | None = None,
) -> dict:
    """CHAIR of generated captions.

    captions: [{"image_id": int, "caption": str}]; every image_id must be in `gt_objects`.
    Returns {"CHAIRs", "CHAIRi", "Recall" (percent), "Len" (tokens), "num_captions",
    "sentences": per-caption mentioned/hallucinated/ground-truth objects and metrics}.
    A ratio with a zero denominator (no mentions at all) is 0 (the reference divides by 0).
    """
    if not captions:
        raise ValueError("no captions to evaluate")
    unknown = sorted({c["image_id"] for c in captions if c["image_id"] not in gt_objects}, key=str)
    if unknown:
        raise ValueError(f"image id(s) without ground-truth objects: {unknown[:10]}")
    vocab = vocab or coco_vocab()
    n_halluc_caps = n_mentions = n_halluc = n_gt = n_recalled = n_words = 0
    sentences = []
    for item in captions:
        gt = set(gt_objects[item["image_id"]])
        processed = caption_words(item["caption"], vocab)
        hallucinated = [m for m in processed.mentions if m[1] not in gt]
        recalled = {node for _, node in processed.mentions if node in gt}
        n_halluc_caps += bool(hallucinated)
        n_mentions += len(processed.mentions)
        n_halluc += len(hallucinated)
        n_gt += len(gt)
        n_recalled += len(recalled)
        n_words += len(processed.words)
        sentences.append({
            "image_id": item["image_id"],
            "caption": item["caption"],
            "mentioned_objects": [list(m) for m in processed.mentions],
            "hallucinated_objects": [list(m) for m in hallucinated],
            "gt_objects": sorted(gt),
            "metrics": {
                "CHAIRs": int(bool(hallucinated)),
                "CHAIRi": len(hallucinated) / len(processed.mentions) if processed.mentions else 0.0,
                "Recall": len(recalled) / len(gt) if gt else 0.0,
                "Len": len(processed.words),
            },
        })
    return {
        "CHAIRs": 100.0 * n_halluc_caps / len(captions),
        "CHAIRi": 100.0 * n_halluc / n_mentions if n_mentions else 0.0,
        "Recall": 100.0 * n_recalled / n_gt if n_gt else 0.0,
        "Len": n_words / len(captions),
        "num_captions": len(captions),
        "sentences": sentences,
    }


def select_captions(
    records: Sequence[rec.Record],
    gt_objects: Mapping[int, Collection[str]],
    image_id_key: str = "image_id",
    caption_key: str = "caption",
) -> tuple[list[dict], list[rec.Problem]]:
    """Valid {"image_id", "caption"} items of `records` and a Problem for each skipped one."""
    kept, problems = [], []
    for r in records:
        try:
            image_id = rec.image_id_of(r.data[image_id_key])
        except ValueError as err:
            problems.append(rec.Problem(r.where, "bad_image_id", str(err)))
            continue
        caption = r.data[caption_key]
        if not isinstance(caption, str):
            problems.append(rec.Problem(r.where, "malformed_line", f"{caption_key!r} is not a string"))
        elif not caption.strip():
            problems.append(rec.Problem(r.where, "empty_caption", f"empty caption for image {image_id}"))
        elif image_id not in gt_objects:
            problems.append(rec.Problem(r.where, "unknown_image_id", f"image {image_id} has no ground-truth objects"))
        else:
            kept.append({"image_id": image_id, "caption": caption})
    return kept, problems


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; prints {"CHAIRs", "CHAIRi", "Recall", "Len", ...} as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m fisao_jax.eval.chair",
        description="CHAIR hallucination metrics (CHAIRs, CHAIRi, Recall in percent; Len in tokens).",
    )
    parser.add_argument("--captions", required=True, help="JSONL (or JSON array) of {image_id, caption}")
    gt_group = parser.add_mutually_exclusive_group()
    gt_group.add_argument("--gt_objects",
                          help="JSON(.gz) {image_id: [objects]} of ground-truth objects (default: the packaged "
                               "objects of all COCO 2014 train+val images)")
    gt_group.add_argument("--coco_annotations", help="folder with COCO 2014 instances_*/captions_* JSON files")
    parser.add_argument("--synonyms", help="synonyms.txt (default: the packaged reference table)")
    parser.add_argument("--custom_vocab", action="store_true",
                        help="treat --synonyms as a custom object world (singular forms and two-word "
                             "synonyms matched) instead of the reference COCO table")
    parser.add_argument("--image_id_key", default="image_id")
    parser.add_argument("--caption_key", default="caption")
    parser.add_argument("--output", help="write per-caption details to this JSON file")
    parser.add_argument("--strict", action="store_true", help="fail instead of skipping bad input lines")
    args = parser.parse_args(argv)

    try:
        if args.custom_vocab:
            if not args.synonyms:
                parser.error("--custom_vocab needs --synonyms")
            vocab = vocab_from_synonym_lines(pathlib.Path(args.synonyms).read_text(encoding="utf-8").splitlines())
        else:
            vocab = coco_vocab(args.synonyms)
        if args.coco_annotations:
            gt = ground_truth_from_coco_dir(args.coco_annotations, vocab)
        else:
            gt = load_gt_objects(args.gt_objects or default_gt_objects_path())
        records, problems = rec.read_records(args.captions, [args.image_id_key, args.caption_key])
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    captions, more = select_captions(records, gt, args.image_id_key, args.caption_key)
    problems += more
    rec.report_problems(problems, args.strict)
    if not captions:
        sys.exit(f"error: {args.captions}: no valid captions to evaluate")
    result = chair_scores(captions, gt, vocab)
    if args.output:
        rec.write_json_atomic(args.output, result)
    summary = {k: v for k, v in result.items() if k != "sentences"}
    summary["skipped"] = rec.count_problems(problems)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
