"""Compile the FiSAO job for a TPU slice on this machine (no TPU, no weights): per-device FLOPs,
FLOP efficiency and memory of the rollout, scoring and PPO update.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"    # libtpu
    JAX_PLATFORMS=cpu python tools/aot_compile.py --config configs/llava7b.py --topology v5e-8
    JAX_PLATFORMS=cpu python tools/aot_compile.py --config configs/llava7b.py --topology v4-8 \\
        --batch 64 --minibatches 2 --json v4-8.json
    JAX_PLATFORMS=cpu python tools/aot_compile.py --topology v5e-8 --layers 2 --vision_layers 2   # seconds, not minutes
    JAX_PLATFORMS=cpu python tools/aot_compile.py --topology v5e-8 --find_batch

Topologies: v2-8 v3-8 v4-8 v5p-8 v5e-8 v6e-8 (one host), v5e-16 (multi-host), v5e-1 v6e-1
(one chip: parallel efficiency = flops(1 chip) / (devices x flops per device)). The mesh is
the config's (`--mesh data=1,fsdp=8,tensor=1` overrides it). For each phase it prints and
writes (`--json`, also when the job does not fit) `flops_per_device`,
`ideal_flops_per_device` (the phase's work compiled batch-sharded with no loop),
`argument_bytes`, `output_bytes`, `temp_bytes`, `fits` (peak vs the device's HBM) and the
compile seconds. Exit status: 0 fits, 1 does not fit, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "llava7b.py"), help="config file[:variant]")
    ap.add_argument("--topology", default="v5e-8", help="target slice (see above)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the model's)")
    ap.add_argument("--vision_layers", type=int, default=0, help="vision tower layers (0 = the model's)")
    ap.add_argument("--batch", type=int, default=0, help="train.batch_size (prompts per rollout)")
    ap.add_argument("--minibatches", type=int, default=0, help="ppo.num_minibatches")
    ap.add_argument("--new_tokens", type=int, default=0, help="rollout.max_new_tokens")
    ap.add_argument("--mesh", default="", help="e.g. data=1,fsdp=8,tensor=1 (default: the config's)")
    ap.add_argument("--phases", default="rollout,scoring,update")
    ap.add_argument("--find_batch", action="store_true", help="the largest batch (at the config's minibatch rows "
                    "per device) whose every phase fits")
    ap.add_argument("--json", default="", help="write the results here")
    return ap.parse_args(argv)


def load_config(args):
    from fisao_jax.config_base import load_config_file

    path, _, variant = args.config.partition(":")
    config = load_config_file(path, variant or None)
    if args.batch:
        config.train.batch_size = args.batch
    if args.minibatches:
        config.ppo.num_minibatches = args.minibatches
    if args.new_tokens:
        config.rollout.max_new_tokens = args.new_tokens
    if args.mesh:
        for item in args.mesh.split(","):
            name, _, size = item.partition("=")
            if name.strip() not in ("data", "fsdp", "tensor") or not size.strip().lstrip("-").isdigit():
                raise ValueError(f"--mesh: bad entry {item!r} (expected data=N,fsdp=N,tensor=N)")
            config.mesh[name.strip()] = int(size)
    return config


def table(phases, target) -> str:
    gib = 2 ** 30
    lines = [f"{'phase':<9}{'TFLOP/dev':>10}{'ideal':>9}{'eff':>6}{'args':>8}{'out':>7}{'temp':>8}{'peak GiB':>10}"
             f"{'fits':>6}{'compile s':>11}"]
    for p in phases:
        lines.append(f"{p.name:<9}{p.flops_per_device / 1e12:>10.2f}{p.ideal_flops_per_device / 1e12:>9.2f}"
                     f"{p.efficiency:>6.2f}{p.argument_bytes / gib:>8.2f}{p.output_bytes / gib:>7.2f}"
                     f"{p.temp_bytes / gib:>8.2f}{p.peak_bytes / gib:>10.2f}{'yes' if p.fits else 'NO':>6}"
                     f"{p.compile_seconds:>11.1f}")
    lines.append(f"({target.name}: {target.hbm_gib:g} GiB HBM, {target.peak_tflops:g} bf16 TFLOP/s per device)")
    return "\n".join(lines)


def find_batch(config, target, args, compile_job, devices: int) -> tuple[int, list]:
    """The largest batch whose every phase fits, in steps of one row per batch shard per
    minibatch: doubling until a batch does not fit, then bisecting."""
    from fisao_jax.dry_run import mesh_shape

    mesh = mesh_shape(config, devices)
    step = config.ppo.num_minibatches * mesh.get("data", 1) * mesh.get("fsdp", 1)

    def fits(batch):
        config.train.batch_size = batch
        phases = compile_job(config, target, args.layers, args.vision_layers, args.phases.split(","))
        print(f"batch {batch}: " + ", ".join(f"{p.name} {p.peak_bytes / 2**30:.2f} GiB" for p in phases), flush=True)
        return all(p.fits for p in phases), phases

    best, best_phases, batch = 0, None, step
    while True:
        ok, phases = fits(batch)
        if not ok:
            break
        best, best_phases, batch = batch, phases, batch * 2
    low, high = best, batch
    while high - low > step:
        mid = (low + high) // 2 // step * step
        ok, phases = fits(mid)
        if ok:
            low, best, best_phases = mid, mid, phases
        else:
            high = mid
    return best, best_phases


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from fisao_jax import compile_target as ct

    if args.topology not in ct.TARGETS:
        print(f"error: --topology must be one of {sorted(ct.TARGETS)}, got {args.topology!r}", file=sys.stderr)
        return 2
    if not ct.libtpu_available():
        print('error: libtpu is not installed: pip install "jax[tpu]==<the installed jax version>"', file=sys.stderr)
        return 2
    try:
        config = load_config(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = ct.TARGETS[args.topology]
    started = time.time()
    if args.find_batch:
        batch, phases = find_batch(config, target, args, ct.compile_job, len(ct.target_devices(target)))
        if phases is None:
            print(f"no batch fits {target.name}", file=sys.stderr)
            return 1
        config.train.batch_size = batch
        print(f"largest batch that fits: {batch} ({config.ppo.num_minibatches} minibatches)")
    else:
        phases = ct.compile_job(config, target, args.layers, args.vision_layers, args.phases.split(","),
                                progress=lambda name: print(f"compiling {name} for {target.name} ...", flush=True))
    print(table(phases, target))
    bound = ct.step_seconds_lower_bound(phases, target, config)
    print(f"iteration lower bound at bf16 peak: {bound:.2f} s ({config.train.batch_size} prompts)")
    fits = all(p.fits for p in phases)
    if args.json:
        out = {"topology": target.name, "config": args.config, "layers": args.layers or None,
               "vision_layers": args.vision_layers or None, "batch": config.train.batch_size,
               "minibatches": config.ppo.num_minibatches, "new_tokens": config.rollout.max_new_tokens,
               "prompt_len": config.data.max_prompt_len, "mesh": dict(config.mesh), "fits": fits,
               "iteration_seconds_lower_bound": bound, "seconds": time.time() - started,
               "phases": {p.name: p.to_dict() for p in phases}}
        from fisao_jax import atomic
        atomic.write_json(pathlib.Path(args.json), out, indent=1)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
