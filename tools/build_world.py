"""Pretrain (or load from the cache) the synthetic world's tokenizer, CLIP and SFT LLaVA.

    python tools/build_world.py --workdir runs/tiny
    python tools/build_world.py --workdir /tmp/w --preset test --set sft.steps=50 --set world.hallucination_rate=0.4

Stages are cached under WORKDIR/world/ by a hash of their settings; a second run with the
same settings loads them. Prints the stage folders and the quality metrics (CLIP presence
AUC on held-out scenes; greedy SFT captions: CHAIR, precision / recall, partner rate) and,
with --json, writes them to a file.
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def apply_overrides(cfg_dict: dict, overrides: list[str]) -> dict:
    """Set dotted keys ('sft.steps=50') in a nested config dict; unknown keys raise."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. sft.steps=50")
        key, value = item.split("=", 1)
        node = cfg_dict
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"--set {item!r}: no section {p!r} (sections: world, tokenizer, clip, sft)")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"--set {item!r}: unknown key {parts[-1]!r} (known: {sorted(node)})")
        node[parts[-1]] = _parse_value(value)
    return cfg_dict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--workdir", required=True, help="run folder; stages go to WORKDIR/world/")
    ap.add_argument("--preset", choices=["default", "test"], default="default",
                    help="'default': the CPU demo sizes; 'test': tiny sizes, seconds")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set clip.steps=200 --set world.hallucination_rate=0.4")
    ap.add_argument("--seed", type=int, default=None, help="data / init seed (default: the preset's)")
    ap.add_argument("--rebuild", action="store_true", help="replace damaged cache folders instead of failing")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write paths and metrics to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    from fisao_jax import atomic
    from fisao_jax.world import build, configs

    base = configs.default_build_config() if args.preset == "default" else configs.test_build_config()
    try:
        d = apply_overrides(configs.to_dict(base), args.overrides)
        if args.seed is not None:
            d["seed"] = args.seed
        cfg = configs.build_config_from_dict(d)
        arts = build.build_world(args.workdir, cfg, on_invalid="rebuild" if args.rebuild else "error",
                                 progress=not args.quiet)
    except (ValueError, build.WorldCacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = {
        "tokenizer_dir": str(arts.tokenizer_dir), "clip_dir": str(arts.clip_dir), "llava_dir": str(arts.llava_dir),
        "prompt_len": arts.prompt_len, "trained": list(arts.trained), "seconds": arts.seconds,
        "metrics": arts.metrics,
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        atomic.write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
