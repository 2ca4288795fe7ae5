"""Convert a Hugging Face LLaVA, CLIP, InstructBLIP or BLIP-2 retrieval checkpoint into a
fisao_jax checkpoint.

    python tools/convert_hf.py --src HF_DIR --dst OUT_DIR [--dtype float32|bfloat16] [--overwrite]

Detects the model from `config.json` (model_type 'llava', 'clip', 'instructblip', or 'blip-2'
with architecture Blip2ForImageTextRetrieval), reads (sharded) safetensors without torch,
accepts both `vision_tower.` and `vision_tower.vision_model.` LLaVA key layouts, and writes
`OUT_DIR/params` (orbax) plus `OUT_DIR/fisao_config.json`. Tokenizer and
processor files are copied along. Missing, unexpected or mis-shaped tensors: one error that
lists every offending key, and nothing is written.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    ap.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored parameter dtype")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)

    from fisao_jax.models import hf_io

    try:
        kind = hf_io.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except (hf_io.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {kind} checkpoint {args.src} -> {args.dst} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
