"""Verifier hot path on a rollout batch: entity spans + CLIP scores, ours (one jitted function
over [B, T] token ids) vs a naive per-sample loop, same weights, same batch, same process; and
its share of a measured PPO iteration.

Setup (random weights everywhere; nothing is downloaded):
  tokenizer  a LLaMA-style SentencePiece BPE (`train_tokenizer`, ~4k pieces) trained on
             generated caption-like sentences that use the entity vocabulary. It is also the
             CLIP text tokenizer (CLIP's own BPE files cannot be fetched); CLIP's EOS is the
             tokenizer's highest id (<pad>), as in OpenAI CLIP, so both pooling rules agree.
  vocabulary the packaged entity vocabulary (`load_entity_vocab()`, ~4.3k surface forms).
  responses  B caption-like responses of up to T tokens (sentences until the row's length,
             drawn in [0.8 T, T], is reached; then EOS; right padded), many object mentions.
  CLIP       transformers `CLIPModel`, text tower of ViT-B/32 size (width 512, 12 layers,
             8 heads, MLP 2048, 77 positions, projection 512); vision tower small (width 256,
             4 layers, 112 px / patch 14). Loaded into our Flax CLIP with `hf_io.from_hf`.

Implementations:
  ours   `find_entity_spans` + `span_scores` against the precomputed entity text table, one
         jitted call; image embeddings one batched jitted call (timed apart, then included).
         The table is built once per run (and cached on disk by the trainer): timed apart.
  naive  per response: `tokenizer.decode`, lower-case, split into words on non-alphanumerics,
         match surface forms greedily longest-first (the exact text between words, so
         "t-shirt" is one form), then one transformers CLIP text forward per mention
         ("a photo of a {form}.") and the cosine with that row's image embedding (one
         transformers image forward per response). transformers/PyTorch is what a naive user
         would call, and on CPU it is faster per single short text than our Flax tower.

Both must find the same mentions in the same order and give the same scores (max |diff| of
100 * cos is printed; the run fails above 1e-3). Timings: median of repeats after a warm-up
call; compile time apart. The naive loop is slow, so it is timed on `--naive-rows` rows
(all by default) and scaled to the batch linearly (rows are independent); the table says so.

PPO iteration: a policy whose vision tower has the verifier's vision size and whose LLaMA has
the `--policy` size of `common.SIZES` ('tiny' by default: hidden 32, 2 layers), vocabulary of
the tokenizer, LoRA r 8, batch B, T new tokens: rollout (`make_rollout`), scoring
(`make_score_fn`: reference log-probs, spans, image embeddings, rewards, GAE) and the PPO
update (4 epochs x 4 minibatches), each timed apart. A real policy costs far more per token
while the span finder does not depend on the policy's size, so the measured share is an upper
bound. An estimate for LLaVA-1.5-7B from FLOPs and from the paper's wall clock is printed too.

    python benchmarks/bench_verifier.py            # B 64, T 256, all rows naive, tiny policy
    python benchmarks/bench_verifier.py --quick    # naive on 16 rows, fewer repeats
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
from verifier_workload import (  # noqa: E402
    CLIP_PROJECTION,
    CLIP_TEXT,
    CLIP_VISION,
    TEMPLATE,
    NaiveVerifier,
    compare,
    make_responses,
    ours_as_lists,
    pick_torch_threads,
    save_random_clip,
    training_corpus,
)


# ----------------------------------------------------------------------------- PPO iteration

def measure_ppo_iteration(tokenizer, policy: str, clip_module, clip_params, text_table, span_table, pixels,
                          new: int, repeats: int) -> dict:
    """Seconds per stage of one PPO iteration (rollout, scoring, update; medians after a warm-up
    call, whose time is reported as 'first call') for a random LLaVA of size `policy` whose
    vision tower has the verifier's vision size, so that the scoring step's verifier reads
    the same pixels."""
    import jax
    import jax.numpy as jnp
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    import torch

    from fisao_jax import ppo
    from fisao_jax.models import hf_io
    from fisao_jax.models.configs import LoRAConfig
    from fisao_jax.params import split_params
    from fisao_jax.rewards.reward import RewardParams
    from fisao_jax.rewards.verifier import Verifier, VerifierState
    from fisao_jax.rollout import SamplingConfig, make_rollout
    from fisao_jax.scoring import ScoreSettings, make_policy_fn, make_score_fn
    from fisao_jax.train_state import TrainState
    from fisao_jax.update import make_optimizer

    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(common.SIZES[policy]["text"], vocab_size=len(tokenizer), max_position_embeddings=1024)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(projection_dim=CLIP_PROJECTION, **CLIP_VISION),
                      text_config=LlamaConfig(rope_theta=10000.0, **text), image_token_index=image_token,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        hf = LlavaForConditionalGeneration(cfg).eval()
        n_params = sum(p.numel() for p in hf.parameters())
        hf.save_pretrained(tmp)
        del hf
        module, params = hf_io.from_hf(tmp, lora=LoRAConfig(rank=8, alpha=16.0), lora_key=jax.random.PRNGKey(0))

    batch = pixels.shape[0]
    n_img = (CLIP_VISION["image_size"] // CLIP_VISION["patch_size"]) ** 2
    prompt = ([tokenizer.bos_token_id] + [image_token] * n_img
              + tokenizer("Please describe this image in detail.", add_special_tokens=False)["input_ids"])
    dev = {"input_ids": jnp.asarray(np.tile(np.array(prompt, np.int32), (batch, 1))),
           "attention_mask": jnp.ones((batch, len(prompt)), jnp.int32), "pixel_values": jnp.asarray(pixels)}
    rollout = make_rollout(module, SamplingConfig(max_new_tokens=new, temperature=1.0,
                                                  eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id))
    verifier = Verifier(clip_module, tokenizer, eos_token_id=tokenizer.eos_token_id)
    vstate = VerifierState(clip_params, text_table, span_table)
    score = jax.jit(make_score_fn(module, verifier, ScoreSettings()))
    rp = RewardParams.create(10.0, 1.0, -1.0, -5.0, 5.0)
    optimizer = make_optimizer(1e-5)
    update = jax.jit(ppo.make_ppo_update(make_policy_fn(module), optimizer, ppo_epochs=4, num_minibatches=4))
    trainable, frozen = split_params(params)
    state = TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32))

    def run_rollout():
        return jax.block_until_ready(rollout(params, dev, jax.random.PRNGKey(0)))

    t0 = time.perf_counter()
    roll = run_rollout()
    first = {"rollout": time.perf_counter() - t0}

    def run_score():
        return jax.block_until_ready(score(params, vstate, rp, dev, roll.tokens, roll.mask, jax.random.PRNGKey(2), None))

    t0 = time.perf_counter()
    scored = run_score()
    first["scoring"] = time.perf_counter() - t0
    ppo_batch = dict(dev, tokens=roll.tokens, mask=roll.mask, old_logp=scored["old_logp"],
                     old_values=scored["old_values"], advantages=scored["advantages"], returns=scored["returns"])

    def run_update():
        return jax.block_until_ready(update(state, frozen, ppo_batch, jax.random.PRNGKey(1)))

    t0 = time.perf_counter()
    run_update()
    first["update"] = time.perf_counter() - t0
    times = common.time_interleaved({"rollout": run_rollout, "scoring": run_score, "update": run_update},
                                    repeats, warmup=0)
    out = {k: common.median(v) for k, v in times.items()}
    out["first"] = first
    out["params"] = n_params
    out["prompt"] = len(prompt)
    out["new_tokens"] = int(np.asarray(roll.mask).sum())
    return out


def llava7b_estimate(batch: int, new: int, prompt: int = 576 + 50, ppo_epochs: int = 4) -> dict:
    """FLOPs of one PPO iteration of LLaVA-1.5-7B (6.7e9 LM + 0.3e9 ViT-L/14-336 parameters),
    2 P per token forward, 6 P forward + backward, attention ignored:
    rollout (prefill + decode) + reference forward + ppo_epochs updates; and of the verifier:
    image embeddings (one ViT-L pass per image) and span scores (gather + dot, D = 768)."""
    p_lm, p_vit, vit_tokens, dim = 6.74e9, 0.30e9, 577, 768
    tokens = batch * (prompt + new)
    vision = 2 * p_vit * batch * vit_tokens
    ppo_flops = (2 * p_lm * tokens + vision) * 2 + ppo_epochs * (6 * p_lm * tokens + vision)
    return {"ppo_flops": ppo_flops, "image_flops": vision, "score_flops": 2.0 * batch * new * dim,
            # FiSAO paper: 8k prompts, 4 PPO epochs each, ~6 h on 4 A100-80GB.
            "paper_s_per_iteration": 6 * 3600 / 8000 * batch}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    """CLI entry point; prints machine info and markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="responses per batch")
    ap.add_argument("--seq", type=int, default=256, help="tokens per response (padded length)")
    ap.add_argument("--tokenizer-vocab", type=int, default=4000, help="SentencePiece pieces")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls of ours (median reported)")
    ap.add_argument("--naive-rows", type=int, default=0, help="rows the naive loop runs on (0 = all)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="timed passes of the naive loop")
    ap.add_argument("--policy", default="tiny", help="LLaMA size of the PPO iteration (common.SIZES), or 'none'")
    ap.add_argument("--ppo-repeats", type=int, default=2, help="timed PPO iterations (median per stage)")
    ap.add_argument("--cache-dir", default=None,
                    help="entity text table cache (default: a temporary folder, i.e. always rebuilt)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the naive loop (0 = the faster of 1 and all cores, measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="naive on 16 rows, 10 repeats, 1 PPO repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.naive_rows, args.repeats, args.ppo_repeats = 16, 10, 1

    import jax
    import jax.numpy as jnp
    import torch
    from tqdm import tqdm
    from transformers import CLIPModel as HFCLIPModel

    from fisao_jax.models import hf_io
    from fisao_jax.data.tokenizer import train_tokenizer
    from fisao_jax.rewards import verifier
    from fisao_jax.rewards.entities import load_entity_vocab
    from fisao_jax.rewards.spans import build_span_table, find_entity_spans

    common.quiet_transformers()
    common.print_machine(common.machine_info())
    b, t = args.batch, args.seq
    naive_rows = min(args.naive_rows or b, b)
    setup_rows, rows = [], []
    bar = tqdm(total=7, desc="bench_verifier", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        vocab = load_entity_vocab()
        t0 = time.perf_counter()
        tok = train_tokenizer(training_corpus(vocab, 4000, args.seed + 1), tmp / "tok", args.tokenizer_vocab)
        setup_rows.append(["train tokenizer", time.perf_counter() - t0, f"{len(tok)} ids"])
        bar.update()

        clip_eos = tok.pad_token_id  # the highest id, like OpenAI CLIP's EOS
        if clip_eos != len(tok) - 1:
            raise RuntimeError(f"expected <pad> to be the last id ({len(tok) - 1}), got {clip_eos}")
        n_clip = save_random_clip(tmp / "clip", len(tok), clip_eos, args.seed)
        clip_module, clip_params = hf_io.from_hf(tmp / "clip")
        hf = HFCLIPModel.from_pretrained(tmp / "clip", dtype=torch.float32).eval()
        ids, mask = make_responses(tok, vocab, b, t, args.seed + 2)
        pixels = np.random.RandomState(args.seed + 3).randn(
            b, 3, CLIP_VISION["image_size"], CLIP_VISION["image_size"]).astype(np.float32)
        bar.update()

        t0 = time.perf_counter()
        span_table = build_span_table(tok, vocab)
        setup_rows.append(["span table (host, once per run)", time.perf_counter() - t0,
                           f"{len(vocab)} forms, max_span_len {span_table.max_entity_tokens}"])
        # The longest templated form (+ EOS), rounded up to 8: padding to CLIP's 77 (the trainer's
        # default) gives the same embeddings under causal attention, at ~5x the cost here.
        clip_len = max(len(x) + 1 for x in tok([TEMPLATE.format(f) for f in vocab.surface_forms])["input_ids"])
        clip_len = min(-(-clip_len // 8) * 8, CLIP_TEXT["max_position_embeddings"])
        t0 = time.perf_counter()
        text_table = verifier.entity_text_table(
            clip_module, clip_params, tok, vocab.surface_forms, TEMPLATE, progress=False, batch_size=256,
            max_len=clip_len, cache_dir=args.cache_dir or tmp / "cache",
            checkpoint_id=f"bench_verifier-{args.seed}-{len(tok)}")
        text_table = jax.block_until_ready(text_table)
        setup_rows.append(["entity text table (once per run, cached on disk)", time.perf_counter() - t0,
                           f"[{text_table.shape[0]}, {text_table.shape[1]}], padded to {clip_len} tokens"])
        bar.update()

        # --- ours
        def spans_and_scores(ids, mask, img, text_table, span_table):
            entity_ids = find_entity_spans(ids, mask, span_table)
            return entity_ids, verifier.span_scores(img, text_table, entity_ids)

        img_fn = jax.jit(lambda p, x: verifier.image_embeddings(clip_module, p, x))
        j_ids, j_mask, j_pix = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)
        t0 = time.perf_counter()
        img_c = img_fn.lower(clip_params, j_pix).compile()
        img_compile = time.perf_counter() - t0
        img = jax.block_until_ready(img_c(clip_params, j_pix))
        t0 = time.perf_counter()
        hot = jax.jit(spans_and_scores).lower(j_ids, j_mask, img, text_table, span_table).compile()
        hot_compile = time.perf_counter() - t0
        entity_ids, scores = jax.block_until_ready(hot(j_ids, j_mask, img, text_table, span_table))
        times = common.time_interleaved({
            "hot": lambda: jax.block_until_ready(hot(j_ids, j_mask, img, text_table, span_table)),
            "img": lambda: jax.block_until_ready(img_c(clip_params, j_pix)),
        }, args.repeats)
        ours_hot, ours_img = common.median(times["hot"]), common.median(times["img"])
        bar.update()

        # --- naive
        naive = NaiveVerifier(hf, tok, vocab.surface_forms, clip_eos)
        threads = args.threads or pick_torch_threads(naive, ids[0], int(mask[0].sum()), pixels[0])
        torch.set_num_threads(threads)
        setup_rows.append(["torch threads for the naive loop", float("nan"),
                           f"{threads} ({'given' if args.threads else 'the faster of 1 and all cores'})"])
        naive_lists, _, _ = naive(ids, mask, pixels, 1)  # warm-up
        n_img_s, n_text_s = [], []
        for _ in range(args.naive_repeats):
            naive_lists, ti, tt = naive(ids, mask, pixels, naive_rows)
            n_img_s.append(ti * b / naive_rows)
            n_text_s.append(tt * b / naive_rows)
        naive_text, naive_img = common.median(n_text_s), common.median(n_img_s)
        bar.update()

        ours_lists = ours_as_lists(np.asarray(entity_ids), np.asarray(scores), vocab.surface_forms)
        bad_rows, n_compared, worst = compare(ours_lists[:naive_rows], naive_lists)
        mentions = sum(len(r) for r in ours_lists)
        distinct = len({f for r in ours_lists for f, _ in r})

        # --- PPO iteration
        ppo = None
        if args.policy != "none":
            ppo = measure_ppo_iteration(tok, args.policy, clip_module, clip_params, text_table, span_table, pixels,
                                        t, args.ppo_repeats)
        bar.update()
    bar.close()

    scaled = "" if naive_rows == b else f" (timed on {naive_rows} rows, x{b / naive_rows:g})"
    rows.append(["ours: spans + scores (1 jit)", hot_compile, ours_hot * 1e3, 1.0])
    rows.append(["ours: image embeddings (1 jit)", img_compile, ours_img * 1e3, 1.0])
    rows.append(["ours: total", hot_compile + img_compile, (ours_hot + ours_img) * 1e3, 1.0])
    rows.append([f"naive: decode, words, 1 text forward/mention{scaled}", float("nan"), naive_text * 1e3,
                 naive_text / ours_hot])
    rows.append([f"naive: 1 image forward/response{scaled}", float("nan"), naive_img * 1e3, naive_img / ours_img])
    rows.append([f"naive: total{scaled}", float("nan"), (naive_text + naive_img) * 1e3,
                 (naive_text + naive_img) / (ours_hot + ours_img)])

    print(f"load after: {common.load_average()}")
    print(f"\nbatch {b} x {t} tokens ({int(mask.sum())} real), {mentions} mentions "
          f"({mentions / b:.1f}/response, {distinct} distinct forms); CLIP {n_clip / 1e6:.1f}M params "
          f"(text 512 x 12 layers, vision 256 x 4 layers at 112 px)")
    print(f"agreement on {naive_rows} rows: {naive_rows - bad_rows}/{naive_rows} rows with the same mentions, "
          f"{n_compared} mentions, max |score diff| {worst:.2e} (100 * cos)\n")
    print(common.markdown_table(["setup step", "s", "note"], setup_rows))
    print()
    print(common.markdown_table(["implementation", "compile s", "median ms", "slower than ours (x)"], rows))
    if ppo is not None:
        iteration = ppo["rollout"] + ppo["scoring"] + ppo["update"]
        print(f"\nPPO iteration, policy '{args.policy}' LLaMA + verifier-size vision tower "
              f"({ppo['params'] / 1e6:.1f}M params), batch {b}, prompt {ppo['prompt']}, {t} new tokens "
              f"({ppo['new_tokens']} generated), 4 epochs x 4 minibatches, LoRA r 8:\n")
        prow = [[k, ppo["first"][k], ppo[k] * 1e3, ppo[k] / iteration * 100] for k in ("rollout", "scoring", "update")]
        prow.append(["iteration", sum(ppo["first"].values()), iteration * 1e3, 100.0])
        prow.append(["ours: spans + scores", float("nan"), ours_hot * 1e3, ours_hot / iteration * 100])
        prow.append(["ours: spans + scores + image embeddings", float("nan"), (ours_hot + ours_img) * 1e3,
                     (ours_hot + ours_img) / iteration * 100])
        prow.append(["naive: total", float("nan"), (naive_text + naive_img) * 1e3,
                     (naive_text + naive_img) / iteration * 100])
        print(common.markdown_table(["stage", "first call s", "median ms", "% of iteration"], prow))
    est = llava7b_estimate(b, t)
    print(f"\nLLaVA-1.5-7B estimate (batch {b}, prompt 626, {t} new tokens, 4 PPO epochs): "
          f"{est['ppo_flops']:.2e} FLOP per iteration; verifier image embeddings {est['image_flops']:.2e} FLOP "
          f"({est['image_flops'] / est['ppo_flops'] * 100:.2f}%), span scores {est['score_flops']:.2e} FLOP "
          f"({est['score_flops'] / est['ppo_flops'] * 100:.1e}%). The paper's wall clock (8k prompts in ~6 h on "
          f"4 A100) is {est['paper_s_per_iteration']:.0f} s per {b} prompts; ours spans + scores on this CPU "
          f"take {ours_hot / est['paper_s_per_iteration'] * 100:.3f}% of that, the naive loop "
          f"{(naive_text + naive_img) / est['paper_s_per_iteration'] * 100:.1f}%.")
    if bad_rows or worst > 1e-3:
        print(f"FAILED: ours and naive disagree ({bad_rows} rows differ, max |score diff| {worst:.2e})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
