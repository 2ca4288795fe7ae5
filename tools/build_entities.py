"""Build the entity vocabulary (surface form -> canonical category) from COCO + LVIS names.

Regenerate the packaged default vocabulary (needs WordNet: `bash tools/install_wordnet.sh`):

    python tools/build_entities.py --out fisao_jax/resources/entities_v1.json

The paper's unfiltered expansion (every WordNet sense of every part of speech, which brings
in "cat" -> "purge", "chair" -> "lead"), for comparison:

    python tools/build_entities.py --preset paper --out /tmp/entities_paper.json

Output is deterministic: the same inputs and options give the same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shlex
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from fisao_jax import packaged  # noqa: E402
from fisao_jax.rewards import entities, entities_build  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    defaults = entities_build.ExpansionOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", type=pathlib.Path, default=packaged.path(packaged.COCO_CATEGORIES),
                   help="JSON list of COCO category names (default: the packaged list, %(default)s)")
    p.add_argument("--lvis", type=pathlib.Path, default=packaged.path(packaged.LVIS_CATEGORIES),
                   help="JSON list of LVIS categories {id, name, synonyms, synset} (default: the packaged "
                        "list, %(default)s)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="output JSON file")
    p.add_argument("--preset", choices=("default", "paper"), default="default",
                   help="'paper': unfiltered WordNet expansion as in the paper; options below "
                        "override the preset")
    p.add_argument("--no-inflections", action="store_true", help="no plural/singular forms")
    p.add_argument("--no-wordnet", action="store_true", help="no WordNet synonyms")
    p.add_argument("--wordnet-senses", choices=("dataset", "first", "all"),
                   help=f"senses giving synonyms (default {defaults.wordnet_senses!r}: LVIS's synset)")
    p.add_argument("--max-senses", type=int, help=f"senses used with --wordnet-senses first "
                                                   f"(default {defaults.max_senses})")
    p.add_argument("--pos", help=f"WordNet parts of speech, e.g. 'n' or 'nvasr' (default "
                                 f"{''.join(defaults.pos)!r})")
    p.add_argument("--lexnames", help="comma-separated lexicographer files to keep, or 'any' "
                                      f"(default: {','.join(defaults.lexnames)})")
    p.add_argument("--min-depth", type=int, help=f"minimum synset depth (default {defaults.min_depth})")
    p.add_argument("--max-lemma-rank", type=int,
                   help="keep a synonym only if the sense is among its first N senses; 0 = "
                        f"no limit (default {defaults.max_lemma_rank})")
    p.add_argument("--max-words", type=int, help=f"longest synonym in words (default {defaults.max_words})")
    p.add_argument("--keep-proper-nouns", action="store_true", default=None,
                   help="keep capitalised WordNet lemmas")
    p.add_argument("--stop-words", type=pathlib.Path,
                   help="file of synonyms to drop, one per line (replaces the built-in list)")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> entities_build.ExpansionOptions:
    """ExpansionOptions from the preset with command-line overrides."""
    options = entities_build.PAPER_OPTIONS if args.preset == "paper" else entities_build.ExpansionOptions()
    changes = {}
    if args.no_inflections:
        changes["inflections"] = False
    if args.no_wordnet:
        changes["wordnet"] = False
    for field in ("wordnet_senses", "max_senses", "min_depth", "max_words", "keep_proper_nouns"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    if args.max_lemma_rank is not None:
        changes["max_lemma_rank"] = args.max_lemma_rank or None
    if args.pos is not None:
        changes["pos"] = tuple(args.pos)
    if args.lexnames is not None:
        changes["lexnames"] = None if args.lexnames == "any" else tuple(
            x.strip() for x in args.lexnames.split(",") if x.strip())
    if args.stop_words is not None:
        lines = args.stop_words.read_text(encoding="utf-8").splitlines()
        changes["stop_words"] = frozenset(entities.normalise_surface_form(x) for x in lines if x.strip())
    return dataclasses.replace(options, **changes)


def main(argv=None) -> None:
    args = parse_args(argv)
    options = options_from_args(args)
    categories = entities_build.read_categories(args.coco, args.lvis)
    vocab = entities_build.build_entity_vocab(categories, options, progress=True)
    # Recorded relative to the repository so that the output does not depend on the checkout path.
    shown = [_relative(a) for a in (sys.argv[1:] if argv is None else argv)]
    metadata = dict(vocab.metadata)
    metadata["command"] = shlex.join(["python", "tools/build_entities.py", *shown])
    metadata["sources"] = {"coco": args.coco.name, "lvis": args.lvis.name}
    vocab = dataclasses.replace(vocab, metadata=metadata)
    vocab.save(args.out)

    m = vocab.metadata
    print(f"categories: {m['num_categories']} distinct canonical names from "
          f"{m['num_source_categories']['coco']} COCO + {m['num_source_categories']['lvis']} LVIS")
    print(f"surface forms: {m['num_surface_forms']}")
    for origin, n in m["surface_forms_by_origin"].items():
        print(f"  {origin:<20} {n}")
    if m["dropped"]:
        print("dropped: " + ", ".join(f"{k} {v}" for k, v in m["dropped"].items()))
    print(f"wrote {args.out}")


def _relative(arg: str) -> str:
    path = pathlib.Path(arg)
    if path.is_absolute():
        try:
            return str(path.resolve().relative_to(REPO_ROOT.parent))
        except ValueError:
            return arg
    return arg


if __name__ == "__main__":
    main()
