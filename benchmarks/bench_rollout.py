"""Generated tokens/s: our jitted rollout (prefill + KV-cache while_loop) vs transformers
`generate(do_sample=False)`, greedy, float32, same weights and prompts, same process.

Each size builds a random transformers LLaVA, saves it with `save_pretrained`, loads it with
`fisao_jax.models.hf_io.from_hf` and with transformers (sdpa attention by default). Prompts are
left padded (up to 8 pads), one image per row, `n_image_tokens + 32` tokens long. EOS is set to
a token id that neither side produces, so both generate exactly `new` tokens per row; the run
checks this and reports how many rows have token-identical outputs. tokens/s = batch * new /
median wall time of a whole call (prefill included); compile time (lower + compile) and the
compiled call's temporary memory (XLA's `memory_analysis`: KV cache, activations) are
reported separately; warmup calls are not timed; implementations are timed round-robin and
speedups are given on the median and on the fastest call (the steadier estimate on a machine
shared with other work). GFLOP/s = the FLOPs a greedy call needs at least (`call_flops`) / its
fastest time, next to the machine's float32 matmul peak: no implementation can beat another
by more than peak / that one's GFLOP/s; the memory stream rate bounds the memory-bound decode
steps the same way (weights + KV cache read per step). `--profile` splits our time into the
prefill and the per-step cost of the decode loop ((rollout - prefill) / (new - 1)), next to
one decode step run alone.

    python benchmarks/bench_rollout.py                 # tiny + 50m, batch 8/32, 64/256 new tokens
                                                       # (~7 min on 2 idle cores, far longer under load)
    python benchmarks/bench_rollout.py --quick         # 50m, batch 8, 64 new tokens, 2 repeats
    python benchmarks/bench_rollout.py --profile       # also: prefill and one decode step timed alone
    python benchmarks/bench_rollout.py --ops           # also: a decode step's time by operation
                                                       # (XLA profiler, see op_profile.py)
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import op_profile  # noqa: E402

from fisao_jax.models import hf_io
from fisao_jax.rollout import SamplingConfig  # noqa: E402

# A decode step's operations, in the order the --ops table lists them: (category, test on the label).
STEP_CATEGORIES = (
    ("LM head matmul", lambda op: "lm_head/dot_general" in op),
    ("MLP matmuls (gate, up, down)", lambda op: "/mlp/" in op and op.endswith("dot_general")),
    ("attention projections (q, k, v, o)", lambda op: re.search(r"self_attn/[qkvo]_proj/dot_general$", op)),
    ("attention q.k and p.v (batched dots)", lambda op: op.startswith("dot ") or "bkgts" in op),
    ("KV cache writes", lambda op: "self_attn/dynamic_update_slice" in op),
    ("everything else (norms, softmax, sampling, bookkeeping)", lambda op: True),
)


def _pick_eos(avoid: set[int], vocab: int, preferred: int = 2) -> int:
    """A token id in [0, vocab) not in `avoid` (preferring `preferred`)."""
    for t in itertools.chain([preferred], range(vocab)):
        if t not in avoid:
            return t
    raise RuntimeError("every token id was generated; cannot pick an unused EOS")


def _agreement(ours: np.ndarray, ref: np.ndarray, image_token: int) -> str:
    """'k/B rows' identical. Rows that first differ right after a generated image-token id are
    counted apart: such a token has no image feature and both sides must embed it as text."""
    same = (ours == ref).all(axis=1)
    after_image = 0
    for o, r in zip(ours[~same], ref[~same]):
        first = int(np.flatnonzero(o != r)[0])
        after_image += int((r[:first] == image_token).any())
    text = f"{int(same.sum())}/{len(same)} rows"
    if after_image:
        text += f" ({after_image} differ after a generated image token)"
    return text


def _rollout_args(j_args) -> tuple:
    """(batch dict, key) of the rollout from (ids, mask, pixels, key)."""
    ids, mask, pixels, key = j_args
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}, key


def _compile_rollout(module, params, j_args, new: int, eos: int, decode_chunk: int):
    from fisao_jax.rollout import SamplingConfig, make_rollout, validate_inputs

    cfg = SamplingConfig(max_new_tokens=new, greedy=True, eos_token_id=eos, pad_token_id=0, decode_chunk=decode_chunk)
    roll = make_rollout(module, cfg)
    validate_inputs(module, _rollout_args(j_args)[0], cfg)  # what `roll` checks on the host before its jitted call
    t0 = time.perf_counter()
    compiled = roll.jitted.lower(params, *_rollout_args(j_args)).compile()
    return compiled, time.perf_counter() - t0


def call_flops(size: str, batch: int, prompt: int, new: int) -> float:
    """FLOPs a greedy call must do at least (multiply-add = 2): the vision layers up to LLaVA's
    feature layer (-2) and the projector per image, the LM over the prompt with the LM head at
    its last position only, then `new - 1` one-token steps (all LM layers, attention over the
    tokens so far, the LM head). Both implementations do at least this; dividing by a call's
    time gives the fraction of the machine's matmul peak it reaches."""
    s = common.SIZES[size]
    v, t = s["vision"], s["text"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2
    nv, hv = n_img + 1, v["hidden_size"]
    vision_layers = v["num_hidden_layers"] - 1  # hidden_states[-2] is the output of layer L-1
    vision = 2 * n_img * 3 * v["patch_size"] ** 2 * hv + vision_layers * (
        2 * nv * (4 * hv * hv + 2 * hv * v["intermediate_size"]) + 4 * nv * nv * hv)
    h, n_layers, inter, vocab = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], t["vocab_size"]
    kv_dim = h * t["num_key_value_heads"] // t["num_attention_heads"]
    projector = 2 * n_img * (hv * h + h * h)
    layer_weights = 2 * h * h + 2 * h * kv_dim + 3 * h * inter
    prefill = 2 * prompt * n_layers * layer_weights + n_layers * 2 * prompt * prompt * h + 2 * h * vocab
    steps = sum(2 * n_layers * layer_weights + 2 * h * vocab + n_layers * 4 * (prompt + i) * h for i in range(1, new))
    return float(batch * (vision + projector + prefill + steps))


def profile_steps(module, params, j_args, new: int, repeats: int, decode_chunk: int) -> dict:
    """Fastest seconds for the prefill alone and for one decode step alone (each its own jitted
    call, over the cache of the rollout's first decode loop: prompt + min(decode_chunk, new)
    slots), to split a rollout's time into prefill, per-step model cost and loop overhead."""
    import jax
    import jax.numpy as jnp

    from fisao_jax.models.llama import init_cache
    from fisao_jax.models.llava import LlavaModel
    from fisao_jax.models.vlm import default_position_ids
    from fisao_jax.rollout import first_argmax

    ids, mask, pixels, _ = j_args
    b, t = ids.shape
    slots = t + (min(decode_chunk, new) if decode_chunk else new)
    key_mask = jnp.concatenate([mask, jnp.ones((b, slots - t), jnp.int32)], axis=1)

    @jax.jit
    def prefill(p, ids, mask, pixels):
        cache = init_cache(module.cfg.text, b, slots, module.dtype)
        feats = module.apply({"params": p}, pixels, method=LlavaModel.image_features)
        return module.apply({"params": p}, ids, feats, mask, default_position_ids(mask), cache, key_mask,
                            logits_from=t - 1, method=LlavaModel.forward)  # LM head at the last position, as the rollout

    out = prefill(params, ids, mask, pixels)

    @jax.jit
    def step(p, tok, pos, cache):
        o = module.apply({"params": p}, tok[:, None], None, jnp.ones((b, 1), jnp.int32), pos[:, None], cache,
                         key_mask, method=LlavaModel.forward)
        return first_argmax(o["logits"][:, -1]), o["cache"]

    tok = first_argmax(out["logits"][:, -1])
    pos = jnp.sum(mask, -1).astype(jnp.int32)
    cache = out["cache"]
    step(params, tok, pos, cache)
    times = common.time_interleaved({
        "prefill": lambda: jax.block_until_ready(prefill(params, ids, mask, pixels)),
        "step": lambda: jax.block_until_ready(step(params, tok, pos, cache)),
    }, repeats)
    return {k: min(v) for k, v in times.items()}


def step_breakdown(compiled, params, j_args, new: int) -> dict[str, float]:
    """ms per decode step by category (STEP_CATEGORIES) from one traced rollout call."""
    out = {name: 0.0 for name, _ in STEP_CATEGORIES}
    # operations that ran more than once belong to the decode loops (the prefill runs once)
    for label, _, ms in op_profile.per_op(compiled, (params, *_rollout_args(j_args)), per=new - 1, min_count=2):
        out[next(name for name, test in STEP_CATEGORIES if test(label))] += ms
    return out


def bench_size(size: str, batches: list[int], news: list[int], repeats: int, attns: list[str],
               profile: bool, pbar=None, ops: bool = False,
               decode_chunk: int = SamplingConfig.decode_chunk) -> tuple[list[list], list[list], list[list]]:
    """(results rows, profile rows, op-breakdown rows) for one model size."""
    import jax
    import jax.numpy as jnp
    import torch


    s = common.SIZES[size]
    n_img = (s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2
    prompt_len = n_img + 32
    rows, prof_rows, op_rows = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = common.save_random_llava(pathlib.Path(tmp), size)
        module, params = hf_io.from_hf(tmp)
        hf = {a: common.load_hf(pathlib.Path(tmp), a) for a in attns}
    for batch, new in itertools.product(batches, news):
        ids, mask, pixels, _ = common.llava_inputs(size, batch, prompt_len)
        j_args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(pixels),
                  jax.random.PRNGKey(0))
        # Greedy tokens do not depend on the EOS id, only where rows stop: pick an id that
        # neither side generates, so that both run the full `new` steps.
        seen = {s["image_token_index"], 0}
        eos = 2
        for _ in range(3):
            compiled, compile_s = _compile_rollout(module, params, j_args, new, eos, decode_chunk)
            ours = np.asarray(compiled(params, *_rollout_args(j_args)).tokens)
            t_args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), max_new_tokens=new, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
            with torch.no_grad():
                refs = {a: m.generate(**t_args)[:, prompt_len:].numpy() for a, m in hf.items()}
            outs = [ours, *refs.values()]
            if all(o.shape == (batch, new) and not (o == eos).any() for o in outs):
                break
            seen |= set(np.unique(np.concatenate([o.reshape(-1) for o in outs])).tolist())
            eos = _pick_eos(seen, s["text"]["vocab_size"])
        else:
            raise RuntimeError(f"{size} batch {batch} new {new}: could not find an EOS id that no side generates")
        agree = {a: _agreement(ours, r, s["image_token_index"]) for a, r in refs.items()}
        fns = {"ours": lambda: compiled(params, *_rollout_args(j_args)).tokens.block_until_ready()}
        fns.update({a: (lambda m=m: m.generate(**t_args)) for a, m in hf.items()})
        with torch.no_grad():
            runs = common.time_interleaved(fns, repeats)
        med = {k: common.median(v) for k, v in runs.items()}
        best = {k: min(v) for k, v in runs.items()}
        label = [size, f"{n_params / 1e6:.2f}M", batch, prompt_len, new]
        toks = batch * new
        gflop = call_flops(size, batch, prompt_len, new) / 1e9
        for impl in runs:
            rows.append(label + [
                f"ours (jit, decode_chunk {decode_chunk})" if impl == "ours" else f"transformers {impl}",
                compile_s if impl == "ours" else float("nan"),
                compiled.memory_analysis().temp_size_in_bytes / 1e6 if impl == "ours" else float("nan"),
                med[impl], best[impl], toks / med[impl], toks / best[impl],
                med[impl] / med["ours"], best[impl] / best["ours"], gflop / best[impl], agree.get(impl, "-")])
        if profile:
            p = profile_steps(module, params, j_args[:3] + (None,), new, repeats, decode_chunk)
            loop = (best["ours"] - p["prefill"]) / (new - 1)
            prof_rows.append(label + [best["ours"] * 1e3, p["prefill"] * 1e3, p["step"] * 1e3, loop * 1e3,
                                      loop / p["step"]])
        if ops:
            cats = step_breakdown(compiled, params, j_args, new)
            total = sum(cats.values())
            op_rows += [label + [name, ms, f"{100 * ms / total:.0f}%"] for name, ms in cats.items()]
            op_rows.append(label + ["sum (traced)", total, "100%"])
        if pbar is not None:
            pbar.update()
    return rows, prof_rows, op_rows


def main(argv=None) -> int:
    """CLI entry point; prints machine info and markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,50m", help="comma-separated sizes from common.SIZES")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--new", default="64,256", help="comma-separated max_new_tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    ap.add_argument("--attn", default="sdpa",
                    help="transformers attention implementations (e.g. sdpa,eager; '' = ours only)")
    ap.add_argument("--threads", type=int, default=0,
                    help="cores for torch and XLA (0 = all available; fewer pins the process)")
    ap.add_argument("--profile", action="store_true",
                    help="also time the prefill and a single decode step alone (per case)")
    ap.add_argument("--decode_chunk", type=int, default=SamplingConfig.decode_chunk,
                    help="our decode steps per loop (the cache grows between loops; 0 = one loop)")
    ap.add_argument("--ops", action="store_true",
                    help="also break a decode step down by operation (one call under the XLA profiler)")
    ap.add_argument("--quick", action="store_true", help="50m only, batch 8, 64 new tokens, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.new, args.repeats = "50m", "8", "64", 2

    from tqdm import tqdm

    common.configure_threads(args.threads)
    common.quiet_transformers()
    info = common.machine_info()
    common.print_machine(info)
    rows, prof_rows, op_rows = [], [], []
    sizes = args.sizes.split(",")
    batches, news = [int(x) for x in args.batches.split(",")], [int(x) for x in args.new.split(",")]
    with tqdm(total=len(sizes) * len(batches) * len(news), desc="cases", file=sys.stderr) as pbar:
        for size in sizes:
            r, p, o = bench_size(size, batches, news, args.repeats, [a for a in args.attn.split(",") if a],
                                 args.profile, pbar, args.ops, args.decode_chunk)
            rows += r
            prof_rows += p
            op_rows += o
    print(f"load after: {common.load_average()}")
    print(f"float32 matmul peak on these cores (jitted 2048^3, fastest of 5): {common.matmul_peak_gflops():.1f} GFLOP/s")
    print(f"memory stream on these cores (jitted sum over 512 MB, fastest of 5): {common.stream_gbps():.1f} GB/s")
    print()
    print(common.markdown_table(
        ["size", "params", "batch", "prompt", "new", "impl", "compile s", "temp MB", "median s", "min s",
         "gen tokens/s (median)", "gen tokens/s (min)", "ours speedup (median)", "ours speedup (min)",
         "GFLOP/s (min)", "same tokens as ours"], rows))
    if prof_rows:
        print()
        print(common.markdown_table(
            ["size", "params", "batch", "prompt", "new", "rollout ms (min)", "prefill alone ms (min)",
             "1 step alone ms (min)", "loop ms/step", "loop step / step alone"], prof_rows))
    if op_rows:
        print()
        print("decode step by operation (one traced call; tracing inflates the total, compare shares):")
        print(common.markdown_table(["size", "params", "batch", "prompt", "new", "operations", "ms/step (traced)",
                                     "share"], op_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
