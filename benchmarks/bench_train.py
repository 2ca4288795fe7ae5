"""FiSAO iteration time on the tiny config: rollout / scoring / update split, update tokens/s,
and the update's achieved GFLOP/s next to this machine's float32 matmul GFLOP/s (same run).

    python benchmarks/bench_train.py [--iterations 5]

Models have the default synthetic world's sizes (configs/tiny.py) with random weights: the
cost of an iteration does not depend on what the weights learned. FLOPs of the update come
from XLA's cost analysis of the compiled update.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


def tiny_config():
    from fisao_jax.config_base import load_config_file

    return load_config_file(ROOT / "configs" / "tiny.py")


def random_world(config, root: pathlib.Path) -> dict:
    """Tokenizer + random CLIP and LLaVA at the world's configured sizes (converted format)."""
    from fisao_jax.data import synthetic
    from fisao_jax.data.tokenizer import train_tokenizer
    from fisao_jax.models import config_io, configs as C
    from fisao_jax.models.hf_io import init_params, save_params
    from fisao_jax.world import configs as wc
    from fisao_jax.world.pretrain_clip import clip_model_config
    from fisao_jax.world.sft import llava_model_config

    b = wc.build_config_from_dict(config.world.to_dict())
    data = synthetic.make_dataset(b.world, 400, seed=0, split="bench")
    tok = train_tokenizer(data["captions"] + list(synthetic.PROMPTS), root / "tokenizer", b.tokenizer.vocab_size)
    clip_cfg = clip_model_config(b.clip, b.world.image_size, len(tok), tok.eos_token_id)
    llava_cfg = llava_model_config(b.sft, clip_cfg, tok)
    out = {"tokenizer": str(root / "tokenizer")}
    for name, cfg in (("clip", clip_cfg), ("policy", llava_cfg)):
        params = init_params(cfg, jax.random.PRNGKey(0))
        folder = root / name
        folder.mkdir()
        save_params(folder / "params", params)
        kind = "llava" if isinstance(cfg, C.LlavaConfig) else "clip"
        (folder / "fisao_config.json").write_text(json.dumps({"kind": kind, "dtype": "float32",
                                                              "config": config_io.to_dict(cfg)}))
        out[name] = str(folder)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=5, help="timed iterations after the warm-up one")
    args = ap.parse_args(argv)

    from fisao_jax.methods import fisao
    from fisao_jax.params import merge_params
    from fisao_jax.rewards.reward import RewardParams
    from fisao_jax.run.setup import build_setup
    from fisao_jax.update import make_optimizer

    config = tiny_config()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_train_"))
    paths = random_world(config, tmp)
    config.model.policy, config.model.verifier, config.model.tokenizer = paths["policy"], paths["clip"], paths["tokenizer"]
    config.reward.verifier_is_policy_encoder = False  # two random models
    setup = build_setup(config, tmp / "run")
    rp = RewardParams.create(config.reward.margin, 1.0, -1.0, -5.0, 5.0)
    p = config.ppo
    optimizer = make_optimizer(p.lr, weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm)
    state, frozen = fisao.initial_state(setup, config, optimizer)
    steps = fisao.steps_for(setup, config, state, frozen)

    rows, flops = [], None
    for it in range(args.iterations + 1):
        batch, _ = setup.task.train_batch(it * config.train.batch_size, config.train.batch_size)
        b = setup.put_batch(batch)
        params = merge_params(state.trainable, frozen)
        key = jax.random.PRNGKey(it)
        t0 = time.perf_counter()
        roll = jax.block_until_ready(setup.rollout_fn(params, b, key))
        t1 = time.perf_counter()
        s = jax.block_until_ready(steps.score(params, setup.vstate, rp, b, roll.tokens, roll.mask, key, None))
        t2 = time.perf_counter()
        ppo_batch = dict(b, tokens=roll.tokens, mask=roll.mask, old_logp=s["old_logp"], old_values=s["old_values"],
                         advantages=s["advantages"], returns=s["returns"])
        if flops is None:
            flops = steps.update.lower(state, frozen, ppo_batch, key).compile().cost_analysis()
            flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
        t2 = time.perf_counter()
        state, _ = jax.block_until_ready(steps.update(state, frozen, ppo_batch, key))
        t3 = time.perf_counter()
        tokens = (b["input_ids"].shape[1] + roll.tokens.shape[1]) * b["input_ids"].shape[0] * p.ppo_epochs
        rows.append((t1 - t0, t2 - t1, t3 - t2, tokens))
        print(f"iteration {it}: rollout {t1 - t0:.2f}s scoring {t2 - t1:.2f}s update {t3 - t2:.2f}s"
              + ("  (compiles)" if it == 0 else ""))

    timed = np.asarray([r[:3] for r in rows[1:]])
    med = np.median(timed, axis=0)
    tokens = rows[-1][3]
    gf_update = flops / med[2] / 1e9
    gf_matmul = common.matmul_peak_gflops()
    total = med.sum()
    cfg = setup.module.cfg
    print(f"\nconfig: batch {config.train.batch_size}, prompt {b['input_ids'].shape[1]} tokens "
          f"({cfg.num_image_tokens} image), {config.rollout.max_new_tokens} new tokens, "
          f"LLaMA {cfg.text.num_hidden_layers}x{cfg.text.hidden_size}, LoRA r{cfg.lora.rank}, "
          f"{p.ppo_epochs} epochs x {p.num_minibatches} minibatches, {jax.device_count()} CPU device(s)")
    print("| phase | median s | share |")
    print("|---|---|---|")
    for name, v in zip(("rollout", "scoring", "update"), med):
        print(f"| {name} | {v:.3f} | {100 * v / total:.0f}% |")
    print(f"| iteration | {total:.3f} | 100% |")
    print(f"\nupdate: {tokens / med[2]:.0f} tokens/s (prompt+response tokens x epochs), "
          f"{flops / 1e9:.1f} GFLOP (XLA cost analysis) -> {gf_update:.1f} GFLOP/s; "
          f"float32 matmul 2048^3 on this machine: {gf_matmul:.1f} GFLOP/s ({100 * gf_update / gf_matmul:.0f}%)")


if __name__ == "__main__":
    main()
