"""CSR (Calibrated Self-Rewarding, Zhou et al., NeurIPS 2024) on FiSAO's machinery.

    python -m fisao_jax.main --config=configs/tiny.py:csr --workdir=runs/csr_tiny

Each of `csr.iterations` (paper: 3) iterations, with the model the iteration starts from:

1. Sentence-level beam search per prompt. Every active beam gets `num_candidates` sampled
   continuations, each running up to a sentence end (a token whose text ends with '.'),
   EOS, `max_sentence_tokens` tokens, or the response budget (`rollout.max_new_tokens`).
   Each candidate sentence s gets the calibrated reward (paper Eqns 2-4)

       R(s) = clip_weight * max(100 * cos(CLIP_img(image), CLIP_txt(s)), 0) + lm_weight * R_T(s)
       R_T(s) = prod_t P(token_t | prompt, previous tokens)     (the product, Eqn 2, not a mean)

   with the policy's own CLIP (the verifier). Candidates that ended with EOS or used the
   whole budget are final; of the others, the `beam_keep` with the highest and the
   `beam_keep` with the lowest response score stay as beams (top-k and bottom-k). A
   continuation that is EOS alone ends the response without adding a sentence.
2. The final responses with the highest and lowest response score become the pair
   (chosen, rejected). Response score = sum of its sentence rewards (paper: cumulative
   reward R(y) = sum_i R(s_i)); `response_score = 'mean'` averages instead, as the
   authors' released code ranks paths by their mean per-sentence score.
3. DPO (beta = `dpo.beta`) on the LoRA with the reference = the model the iteration
   started from: reference log-probs of the pairs are computed before the first update of
   the iteration, so the adapters keep training across iterations with no second copy or
   merge of the weights (CSR merges and starts fresh adapters each iteration; one adapter
   continued is the same objective with one rank-r adapter). The optimizer restarts every
   iteration, as CSR's separate fine-tuning runs do. Same prompts every iteration (paper).

Differences from the paper, all deliberate: candidates are sampled (temperature
`csr.temperature`) instead of group beam search with a diversity penalty; identical
candidates of a prompt are merged; with the weights 0.9 / 0.1, R_T (a product of
probabilities, at most 1) moves R by at most 0.1, so the CLIP term decides nearly all
rankings, as in the paper's formula.

The beam search is in `csr_search.py`. Workdir: as FiSAO's, plus pairs_<iteration>.jsonl
(texts and scores of every pair). Checkpoints after each iteration (the LoRA); a run resumes
from the newest one.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from fisao_jax import atomic, hosts
from fisao_jax.config_checks import ConfigError, check_section
from fisao_jax.methods import dpo as dpo_lib
from fisao_jax.methods.csr_search import (RESPONSE_SCORES, SearchContext, make_search_context, preference_pair,
                                          response_score, search_batch)
from fisao_jax.params import merge_params, split_params
from fisao_jax.run.batches import pad_to_multiple, prompt_batches
from fisao_jax.run.frame import finish_run, start_run
from fisao_jax.run.log import MetricsLog
from fisao_jax.run.offline import train_epochs
from fisao_jax.train_state import TrainState, counter, init_opt_state
from fisao_jax.update import make_optimizer

SETTINGS = ("csr", "dpo")


class CsrState(TrainState):
    """The adapters and the completed iterations (the optimizer restarts every iteration)."""

    iteration: jax.Array


def validate(config) -> None:
    """ConfigError naming the key for bad `csr.*` / `dpo.*` values."""
    if hosts.count() > 1:
        raise ConfigError(f"method 'csr' runs as one process (one host, any number of its devices); "
                          f"this job has {hosts.count()} processes. Several hosts are for FiSAO.")
    check_section(config, "csr",
                  positive_ints=("iterations", "beam_keep", "num_candidates", "max_sentence_tokens", "max_sentences",
                                 "prompt_batch_size"),
                  positive=("temperature",), non_negative=("clip_weight", "lm_weight", "num_prompts"),
                  choices={"response_score": RESPONSE_SCORES})
    check_section(config, "dpo", positive_ints=("epochs", "batch_size", "num_minibatches"), positive=("beta", "lr"),
                  non_negative=("weight_decay", "max_grad_norm"))
    if config.csr.clip_weight + config.csr.lm_weight <= 0:
        raise ConfigError("config keys 'csr.clip_weight' + 'csr.lm_weight' must be > 0")


def pairs_to_arrays(pairs: list[dict], n: int, pad_id: int, keys: Sequence[str]) -> dict:
    """The pairs as arrays: `keys` (prompt and image inputs) stacked, chosen / rejected responses
    padded to `n` tokens with their masks."""
    def tokens(key):
        toks = np.full((len(pairs), n), pad_id, np.int32)
        mask = np.zeros((len(pairs), n), np.int32)
        for i, p in enumerate(pairs):
            toks[i, :len(p[key])] = p[key]
            mask[i, :len(p[key])] = 1
        return toks, mask

    out = {k: np.stack([p[k] for p in pairs]) for k in keys}
    out["chosen_tokens"], out["chosen_mask"] = tokens("chosen")
    out["rejected_tokens"], out["rejected_mask"] = tokens("rejected")
    return out


def collect_pairs(ctx: SearchContext, params, batches: list, key: jax.Array, progress: bool = True) -> list[dict]:
    """One preference pair per prompt with two distinct final responses (see `preference_pair`)."""
    pairs = []
    for i, (batch, n) in enumerate(tqdm(batches, desc="CSR beam search", unit="batch", disable=not progress,
                                        leave=False)):
        finals = search_batch(ctx, params, batch, jax.random.fold_in(key, i))
        for row in range(n):
            pair = preference_pair(finals[row], ctx.response_kind)
            if pair is None:
                continue
            chosen, rejected = pair
            decode = lambda c: ctx.tokenizer.decode(list(c.tokens), skip_special_tokens=True).strip()  # noqa: E731
            pairs.append({**{k: batch[k][row] for k in ("input_ids", "attention_mask") + ctx.model.image_input_keys},
                          "image_id": _jsonable(batch["image_ids"][row]),
                          "chosen": list(chosen.tokens), "rejected": list(rejected.tokens),
                          "chosen_text": decode(chosen), "rejected_text": decode(rejected),
                          "chosen_score": response_score(chosen, ctx.response_kind),
                          "rejected_score": response_score(rejected, ctx.response_kind),
                          "chosen_clip": list(chosen.clip), "rejected_clip": list(rejected.clip),
                          "num_finals": len(finals[row])})
    return pairs


def train(config, workdir) -> dict:
    """Run (or resume) CSR in `workdir`; returns the summary also written to summary.json."""
    validate(config)
    run = start_run(config, workdir, "csr")
    setup, c, d = run.setup, config.csr, config.dpo
    layout = setup.layout
    optimizer = make_optimizer(d.lr, weight_decay=d.weight_decay, max_grad_norm=d.max_grad_norm)
    trainable, frozen = split_params(setup.params)
    state = CsrState(trainable=trainable, opt_state=init_opt_state(optimizer, trainable, layout), step=counter(),
                     iteration=counter())
    state = layout.place(state, layout.of(state))
    if run.latest is not None:
        state = run.ckpt.restore(run.latest, state)
        print(f"resumed from {run.ckpt.directory / str(run.latest)} (iteration {int(state.iteration)})")
    start = int(state.iteration)
    ctx = make_search_context(setup, config)
    keys = setup.batch_keys
    pair_keys = dpo_lib.PAIR_KEYS + tuple(setup.module.image_input_keys)
    update = dpo_lib.make_dpo_update(setup.module, optimizer, beta=d.beta, num_minibatches=d.num_minibatches)
    shardings, b, r = layout.of(state), layout.batch, layout.replicated
    step = layout.jit(lambda s, fz, batch, key: s.apply(update, fz, batch, key),
                      in_shardings=(shardings, layout.of(frozen), b, r), out_shardings=(shardings, r))
    reference = layout.jit(lambda p, batch: dpo_lib.pair_logprobs(setup.module, p, batch),
                           in_shardings=(setup.param_shardings, b), out_shardings=b)
    num_prompts = c.num_prompts or setup.task.num_train_prompts
    batches = prompt_batches(setup.task, num_prompts, c.prompt_batch_size)
    chunk = d.batch_size * d.num_minibatches
    log = MetricsLog(run.workdir, start)

    for it in tqdm(range(start, c.iterations), initial=start, total=c.iterations, desc="CSR", unit="iter"):
        params = merge_params(state.trainable, frozen)
        t0 = time.time()
        pairs = collect_pairs(ctx, params, batches, jax.random.fold_in(jax.random.PRNGKey(config.seed), it))
        t1 = time.time()
        _write_pairs(run.workdir / f"pairs_{it + 1}.jsonl", pairs)
        metrics = {"csr/pairs": len(pairs), "csr/prompts": num_prompts, "time/beam_search": t1 - t0}
        if pairs:
            metrics.update(_pair_metrics(pairs))
            data = pad_to_multiple(pairs_to_arrays(pairs, config.rollout.max_new_tokens, setup.task.pad_token_id, keys),
                                   chunk)
            data["ref_chosen_logp"], data["ref_rejected_logp"] = _reference_logprobs(
                reference, params, data, d.batch_size, lambda x: layout.put_batch(x, pair_keys))
            # a fresh optimizer every iteration, as CSR's separate fine-tuning runs
            state = state.replace(opt_state=init_opt_state(optimizer, state.trainable, layout), step=counter())
            state = layout.place(state, shardings)
            state, upd, skipped = train_epochs(lambda s, x, k: step(s, frozen, x, k), state, data, chunk, d.epochs,
                                               np.random.default_rng([config.seed, it]), layout.put_batch,
                                               jax.random.fold_in(jax.random.PRNGKey(config.seed + 4), it))
            metrics.update({f"dpo/{k}": v for k, v in upd.items()})
            metrics["dpo/nonfinite_skipped"] = skipped
        metrics["time/dpo"] = time.time() - t1
        state = layout.place(state.replace(iteration=counter(it + 1)), shardings)
        log.write(it + 1, metrics)
        run.ckpt.save(it + 1, state)
        tqdm.write(f"CSR iteration {it + 1}: {len(pairs)} pairs, chosen/rejected score "
                   f"{metrics.get('csr/chosen_score', 0):.2f}/{metrics.get('csr/rejected_score', 0):.2f}, DPO loss "
                   f"{metrics.get('dpo/loss', float('nan')):.4f}, accuracy {metrics.get('dpo/rewards/accuracies', 0):.2f}")
    log.close()
    run.ckpt.close()
    return finish_run(run, merge_params(state.trainable, frozen), c.iterations, SETTINGS)


def _reference_logprobs(reference, params, data: dict, batch_size: int, put) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs [P] of the chosen and rejected responses under `params`, in
    batches of `batch_size` rows (P a multiple of it)."""
    chosen, rejected = [], []
    for s in range(0, len(data["weight"]), batch_size):
        c, r = reference(params, put({k: v[s:s + batch_size] for k, v in data.items()}))
        chosen.append(np.asarray(c))
        rejected.append(np.asarray(r))
    return np.concatenate(chosen), np.concatenate(rejected)


def _jsonable(x):
    x = x.item() if hasattr(x, "item") else x
    return x if isinstance(x, (int, float, str)) else str(x)


def _pair_metrics(pairs: list[dict]) -> dict:
    mean = lambda key: float(np.mean([p[key] for p in pairs]))  # noqa: E731
    return {"csr/chosen_score": mean("chosen_score"), "csr/rejected_score": mean("rejected_score"),
            "csr/chosen_len": float(np.mean([len(p["chosen"]) for p in pairs])),
            "csr/rejected_len": float(np.mean([len(p["rejected"]) for p in pairs])),
            "csr/finals_per_prompt": mean("num_finals")}


def _write_pairs(path, pairs: list[dict]) -> None:
    keys = ("image_id", "chosen_text", "rejected_text", "chosen_score", "rejected_score", "chosen_clip",
            "rejected_clip", "num_finals")
    atomic.write_jsonl(path, ({k: p[k] for k in keys} for p in pairs))
