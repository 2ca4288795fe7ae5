"""Forward tokens/s: our jitted Flax LLaVA vs transformers' PyTorch LlavaForConditionalGeneration
(eager and sdpa attention), float32, same weights and inputs, same process.

Each case builds a random transformers LLaVA of the given size, saves it with `save_pretrained`,
loads it with `fisao_jax.models.hf_io.from_hf` and with transformers, and times a full forward
(vision tower + projector + decoder + LM head over every position) on a left-padded batch with
one image per row. tokens/s = batch * seq / median wall time; compile time (ours: lower +
compile) is reported separately and warmup calls are not timed; implementations are timed
round-robin and the speedup is given on the median and on the fastest call (the fastest is the
steadier estimate on a machine shared with other work). max|diff| is the largest
absolute logit difference against transformers over non-padding positions, in the same run.

    python benchmarks/bench_forward.py            # tiny + 50m, batch 8, seq 128 and 256
    python benchmarks/bench_forward.py --quick    # 50m only, seq 128, 2 repeats
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def bench_size(size: str, batch: int, seqs: list[int], repeats: int, attns: list[str], pbar=None) -> list[list]:
    """Rows of the results table for one model size."""
    import jax
    import jax.numpy as jnp
    import torch

    from fisao_jax.models import hf_io

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = common.save_random_llava(pathlib.Path(tmp), size)
        module, params = hf_io.from_hf(tmp)
        hf = {a: common.load_hf(pathlib.Path(tmp), a) for a in attns}
    fwd = jax.jit(lambda p, ids, pix, mask, pos: module.apply({"params": p}, ids, pix, mask, pos))
    for seq in seqs:
        ids, mask, pixels, pos = common.llava_inputs(size, batch, seq)
        j_args = (params, jnp.asarray(ids, jnp.int32), jnp.asarray(pixels), jnp.asarray(mask, jnp.int32),
                  jnp.asarray(pos, jnp.int32))
        t0 = time.perf_counter()
        compiled = fwd.lower(*j_args).compile()
        compile_s = time.perf_counter() - t0
        ours_logits = np.asarray(compiled(*j_args))
        valid = mask.astype(bool)
        t_args = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                      attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
        diffs = {}
        with torch.no_grad():
            for attn, model in hf.items():
                diffs[attn] = float(np.abs(ours_logits - model(**t_args).logits.numpy())[valid].max())
            fns = {"ours": lambda: compiled(*j_args).block_until_ready()}
            fns.update({attn: (lambda m=model: m(**t_args).logits) for attn, model in hf.items()})
            runs = common.time_interleaved(fns, repeats)
        med = {k: common.median(v) for k, v in runs.items()}
        best = {k: min(v) for k, v in runs.items()}
        tokens = batch * seq
        label = [size, f"{n_params / 1e6:.2f}M", batch, seq]
        for impl in runs:
            rows.append(label + [
                "ours (jax.jit)" if impl == "ours" else f"transformers {impl}",
                compile_s if impl == "ours" else float("nan"),
                med[impl] * 1e3, best[impl] * 1e3, tokens / med[impl],
                med[impl] / med["ours"], best[impl] / best["ours"],
                float("nan") if impl == "ours" else diffs[impl],
                float(np.abs(ours_logits[valid]).max()) if impl == "ours" else float("nan")])
        if pbar is not None:
            pbar.update()
    return rows


def main(argv=None) -> int:
    """CLI entry point; prints machine info and a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,50m", help="comma-separated sizes from common.SIZES")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqs", default="128,256", help="comma-separated total prompt lengths (image tokens included)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    ap.add_argument("--attn", default="eager,sdpa", help="transformers attention implementations")
    ap.add_argument("--threads", type=int, default=0,
                    help="cores for torch and XLA (0 = all available; fewer pins the process)")
    ap.add_argument("--quick", action="store_true", help="50m only, seq 128, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.seqs, args.repeats = "50m", "128", 2

    from tqdm import tqdm

    common.configure_threads(args.threads)
    common.quiet_transformers()
    info = common.machine_info()
    common.print_machine(info)
    rows = []
    sizes, seqs = args.sizes.split(","), [int(s) for s in args.seqs.split(",")]
    with tqdm(total=len(sizes) * len(seqs), desc="cases", file=sys.stderr) as pbar:
        for size in sizes:
            rows += bench_size(size, args.batch, seqs, args.repeats, args.attn.split(","), pbar)
    print(f"load after: {common.load_average()}")
    print()
    print(common.markdown_table(
        ["size", "params", "batch", "seq", "impl", "compile s", "median ms", "min ms", "tokens/s (median)",
         "ours speedup (median)", "ours speedup (min)", "max abs logit diff", "max abs logit"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
