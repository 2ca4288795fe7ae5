"""Export a FiSAO LLaVA (LoRA merged) as a Hugging Face folder for transformers / lmms-eval / vLLM.

    python tools/export_hf.py --ckpt ADAPTER_OR_MODEL --dst HF_OUT [--base MODEL_FOLDER]
                              [--dtype float16|bfloat16|float32] [--max_shard_size 5GB] [--overwrite]

--ckpt is either an adapter folder (`adapter.safetensors` + `fisao_adapter.json`, written by
`fisao_jax.lora_adapter.save_adapter`), whose base weights come from --base (default: the base
recorded in the adapter), or a model folder (written by tools/convert_hf.py, or a Hugging
Face LLaVA folder). --base also supplies the tokenizer and processor files to copy (default:
the model folder). The output folder holds safetensors in the llava-hf key layout, sharded
above --max_shard_size with an index, config.json and the tokenizer files; it appears only
when complete. Load it with `LlavaForConditionalGeneration.from_pretrained(HF_OUT)`.
"""
from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1234' -> 1234."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="adapter folder, converted folder or Hugging Face LLaVA folder")
    ap.add_argument("--dst", required=True, help="output Hugging Face folder (must not exist unless --overwrite)")
    ap.add_argument("--base", default=None,
                    help="model folder with the base weights (for an adapter) and the tokenizer files")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="dtype of the written weights (llava-hf checkpoints are float16)")
    ap.add_argument("--max_shard_size", default="5GB", type=parse_size, help="largest safetensors file, e.g. 5GB")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    from fisao_jax import export
    from fisao_jax.lora_adapter import ExportError
    from fisao_jax.models import hf_io

    try:
        cfg, params, tok_dir = export.load_for_export(args.ckpt, args.base)
        summary = export.export_llava(params, cfg, args.dst, tokenizer_dir=tok_dir, dtype=args.dtype,
                                      max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
                                      progress=not args.quiet)
    except (ExportError, hf_io.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lora = f"LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha:g} merged" if cfg.lora.rank else "no LoRA"
    print(f"exported {args.ckpt} -> {summary.dst}: {summary.num_tensors} tensors, "
          f"{summary.total_bytes / 2**30:.2f} GiB {args.dtype} in {len(summary.weight_files)} file(s), {lora}")
    if any(n in summary.copied for n in ("tokenizer.json", "tokenizer.model")):
        print(f"copied from {tok_dir}: {', '.join(summary.copied)}")
    else:
        print(f"warning: no tokenizer files in {tok_dir}; copy them from the base Hugging Face model "
              "(e.g. llava-hf/llava-1.5-7b-hf) before loading a processor", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
