"""Writes a PNG contact sheet of synthetic-world scenes with their captions.

    python tools/preview_synthetic.py --out synthetic_preview.png --n 16 --seed 0
    python tools/preview_synthetic.py --gallery --out classes.png   # every class, 9 samples each

Each tile shows the scene (upscaled), its biased caption, the ground-truth objects and, in
red, the partners the caption hallucinates.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fisao_jax import atomic
from fisao_jax.data import synthetic


def _save_png(image: Image.Image, path: pathlib.Path) -> None:
    """Temp file + rename, so a crash never leaves a half-written PNG."""
    with atomic.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def scene_sheet(cfg: synthetic.WorldConfig, n: int, seed: int, split: str, cols: int, zoom: int) -> Image.Image:
    """Tiles of scene + caption text, `cols` per row."""
    data = synthetic.make_dataset(cfg, n, seed, split)
    font = ImageFont.load_default(size=12)
    side = cfg.image_size * zoom
    wrap = max(20, side // 7)
    texts = []
    for i in range(n):
        lines = textwrap.wrap(data["captions"][i], wrap)
        lines += textwrap.wrap("GT: " + ", ".join(sorted(data["gt_objects"][i])), wrap)
        extra = "hallucinated: " + ", ".join(sorted(data["hallucinated"][i])) if data["hallucinated"][i] else None
        texts.append((lines, extra))
    text_h = 14 * max(len(lines) + 1 for lines, _ in texts) + 4
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * (side + 8), rows * (side + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (lines, extra) in enumerate(texts):
        x = (i % cols) * (side + 8) + 4
        y = (i // cols) * (side + text_h + 8) + 4
        sheet.paste(Image.fromarray(data["images"][i]).resize((side, side), Image.NEAREST), (x, y))
        ty = y + side + 2
        for line in lines:
            draw.text((x, ty), line, fill="black", font=font)
            ty += 14
        if extra:
            draw.text((x, ty), extra, fill="red", font=font)
    return sheet


def class_gallery(cfg: synthetic.WorldConfig, seed: int, zoom: int) -> Image.Image:
    """One 3x3 scene per class (9 samples of it), 4 classes per row, labelled."""
    font = ImageFont.load_default(size=14)
    side = cfg.image_size * zoom
    cols = 4
    rows = -(-len(cfg.classes) // cols)
    sheet = Image.new("RGB", (cols * (side + 8), rows * (side + 26)), "white")
    draw = ImageDraw.Draw(sheet)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(cfg.classes):
        one = synthetic.WorldConfig(
            image_size=cfg.image_size, classes=(name,), min_objects=9, max_objects=9, cooccurrence=()
        )
        image = synthetic.sample_scene(rng, one).image
        x, y = (i % cols) * (side + 8) + 4, (i // cols) * (side + 26) + 4
        draw.text((x, y), name, fill="black", font=font)
        sheet.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (x, y + 18))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("synthetic_preview.png"), help="PNG to write")
    parser.add_argument("--n", type=int, default=16, help="number of scenes")
    parser.add_argument("--cols", type=int, default=4, help="tiles per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=64, help="scene side in pixels")
    parser.add_argument("--hallucination-rate", type=float, default=0.5)
    parser.add_argument("--zoom", type=int, default=4, help="upscaling factor of each scene")
    parser.add_argument("--gallery", action="store_true", help="draw every class instead of scenes")
    args = parser.parse_args(argv)
    if args.n < 1 or args.cols < 1 or args.zoom < 1:
        parser.error("--n, --cols and --zoom must be >= 1")
    try:
        cfg = synthetic.WorldConfig(image_size=args.image_size, hallucination_rate=args.hallucination_rate)
    except ValueError as e:
        parser.error(str(e))
    if args.gallery:
        sheet = class_gallery(cfg, args.seed, args.zoom)
    else:
        sheet = scene_sheet(cfg, args.n, args.seed, args.split, args.cols, args.zoom)
    _save_png(sheet, args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
