"""Per-device memory of FiSAO training (weights, LoRA, AdamW, KV cache, activations) on a mesh.

    python tools/memory_plan.py --config llava7b --mesh data=1,fsdp=8,tensor=1 --batch 8 \
        --prompt_len 640 --new_tokens 512 --lora_rank 128 [--dtype bfloat16] [--device v5e-8]

--config is 'llava7b' (llava-hf/llava-1.5-7b-hf) or a model folder (converted: fisao_config.json,
or Hugging Face: config.json). Parameter rows are exact for the sharding rules of
fisao_jax/sharding.py; activation, logit and KV rows are estimates whose formulas are in
fisao_jax/memory.py. --batch is the global rollout batch; the PPO update runs it in
--minibatches. With --device the plan says whether the peak fits that device's HBM less
--reserve; --find_batch picks the largest rollout batch and PPO minibatch that fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys


def load_config(name: str, lora_rank: int, lora_alpha: float):
    """A LlavaConfig with the given LoRA from a known name or a model folder."""
    from fisao_jax.models import config_io, configs as C

    lora = C.LoRAConfig(rank=lora_rank, alpha=lora_alpha)
    if name == "llava7b":
        return C.llava_1_5_7b(lora)
    folder = pathlib.Path(name)
    if (folder / "fisao_config.json").is_file():
        cfg = config_io.from_dict(json.loads((folder / "fisao_config.json").read_text())["config"])
    elif (folder / "config.json").is_file():
        cfg = C.llava_from_hf(json.loads((folder / "config.json").read_text()))
    else:
        raise ValueError(f"--config {name!r}: not 'llava7b' and not a folder with fisao_config.json or config.json")
    if not isinstance(cfg, C.LlavaConfig):
        raise ValueError(f"--config {name!r} is not a LLaVA model")
    return dataclasses.replace(cfg, lora=lora)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llava7b", help="'llava7b' or a converted / Hugging Face model folder")
    ap.add_argument("--mesh", default="data=1,fsdp=8,tensor=1", help="axis sizes, e.g. data=1,fsdp=8,tensor=1")
    ap.add_argument("--batch", type=int, default=8, help="global rollout batch (prompts per PPO iteration)")
    ap.add_argument("--minibatches", type=int, default=1, help="PPO minibatches per rollout batch")
    ap.add_argument("--prompt_len", type=int, default=640, help="prompt tokens incl. the 576 image tokens")
    ap.add_argument("--new_tokens", type=int, default=512, help="generated tokens per prompt")
    ap.add_argument("--lora_rank", type=int, default=128)
    ap.add_argument("--lora_alpha", type=float, default=256.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="frozen weights, activations and KV cache")
    ap.add_argument("--trainable_dtype", default="float32", choices=["float32", "bfloat16"],
                    help="LoRA + value head, gradients, AdamW moments")
    ap.add_argument("--remat", default="layer", choices=["layer", "none"],
                    help="rematerialise each decoder layer in the backward pass, or save everything")
    ap.add_argument("--logits", default="full", choices=["full", "response"],
                    help="LM head over every position, or over the response tokens only")
    ap.add_argument("--device", default=None,
                    help="v2-8, v3-8, v4-8, v5e-8, v5p-8, v6e-8, a100-40g, a100-80g or h100-80g")
    ap.add_argument("--reserve", type=float, default=0.1, help="fraction of HBM kept for XLA scratch")
    ap.add_argument("--find_batch", action="store_true",
                    help="choose the largest rollout batch and PPO minibatch that fit --device")
    args = ap.parse_args(argv)

    from fisao_jax import memory

    try:
        cfg = load_config(args.config, args.lora_rank, args.lora_alpha)
        mesh = memory.parse_mesh(args.mesh)
        acc = memory.accelerator(args.device) if args.device else None
        if acc is not None:
            memory.check_mesh_fits_device(mesh, acc)
        work = memory.Workload(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               minibatches=args.minibatches, dtype=args.dtype,
                               trainable_dtype=args.trainable_dtype, remat=args.remat, logits=args.logits)
        if args.find_batch:
            if acc is None:
                raise ValueError("--find_batch needs --device")
            best = memory.best_batch(cfg, mesh, work, acc, args.reserve)
            if best is None:
                smallest = dataclasses.replace(work, batch=mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1),
                                               minibatches=1)
                print(memory.format_table(memory.plan(cfg, mesh, smallest), acc, args.reserve))
                print(f"no batch fits {acc.name} with mesh {mesh}")
                return 2
            work = best
        p = memory.plan(cfg, mesh, work)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(memory.format_table(p, acc, args.reserve))
    return 0 if acc is None or memory.fits(p, acc, args.reserve) else 2


if __name__ == "__main__":
    sys.exit(main())
