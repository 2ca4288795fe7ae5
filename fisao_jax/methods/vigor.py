"""ViGoR, automatic variant (Yan et al., 2024) on FiSAO's machinery.

    python -m fisao_jax.main --config=configs/tiny.py:vigor --workdir=runs/vigor_tiny

Offline, as in the paper (supervision generated once with the initial model):

1. `vigor.num_samples` (paper: 5) sampled responses per training prompt (the rollout
   settings of `config.rollout`).
2. Every entity mention (the FiSAO span finder) gets the verifier score s = 100 * cos
   (the policy's own CLIP in place of Grounding DINO). A noun is rejected when s is below
   the threshold (`vigor.threshold`: 'midpoint' = (s_c + s_h) / 2 of the calibration
   baseline, 's_h', 's_c', or 'fixed' = `vigor.threshold_value`), accepted otherwise.
3. Selection: the sample with the smallest penalty (`vigor.penalty`: 'count' = number
   of rejected nouns, 'strength' = sum of (threshold - s) over them); ties go to the sample
   with more accepted nouns ('count') or larger summed (s - threshold) ('strength'), then
   to the earlier sample. (The paper normalises each signal stream by its variance before
   adding streams; with the one stream here that scale does not change the ranking.)
4. Refinement: the sentences (split after tokens ending in '.') holding a rejected noun
   are dropped; the rest, with the response's EOS, is the target. Prompts left with
   nothing are skipped.
5. SFT (the autoregressive loss on the refined response) on the LoRA, `sft.epochs`
   (paper: 2) epochs of minibatches of `sft.batch_size` (paper: 32).

Workdir: as FiSAO's, plus vigor_data.npz (the SFT set, reused on resume) and
vigor_samples.jsonl (selected and refined texts). Checkpoints after every epoch.
"""
from __future__ import annotations

import pathlib
import time
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from fisao_jax import atomic, hosts
from fisao_jax.config_checks import ConfigError, check_section
from fisao_jax.methods.csr_search import sentence_end_table
from fisao_jax.methods.sft import make_sft_update
from fisao_jax.params import merge_params, split_params
from fisao_jax.run.batches import pad_to_multiple, prompt_batches
from fisao_jax.run.frame import finish_run, start_run
from fisao_jax.run.log import MetricsLog
from fisao_jax.run.offline import train_epochs
from fisao_jax.train_state import TrainState, counter, init_opt_state
from fisao_jax.update import make_optimizer

THRESHOLDS = ("midpoint", "s_h", "s_c", "fixed")
PENALTIES = ("count", "strength")
SETTINGS = ("vigor", "sft")


class VigorState(TrainState):
    """The SFT state and the completed epochs."""

    epoch: jax.Array


def rejection_threshold(baseline, kind: str, value: float = 0.0) -> float:
    """The score below which a noun is rejected (see the module docstring)."""
    if kind == "midpoint":
        return 0.5 * (baseline.s_c + baseline.s_h)
    if kind == "s_h":
        return float(baseline.s_h)
    if kind == "s_c":
        return float(baseline.s_c)
    if kind == "fixed":
        return float(value)
    raise ValueError(f"config key 'vigor.threshold' must be one of {THRESHOLDS}, got {kind!r}")


def noun_penalties(scores: np.ndarray, entity_ids: np.ndarray, threshold: float,
                   kind: str = "count") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-response penalty and positive score, and the rejected mention positions.

    scores, entity_ids [R, N] (verifier scores at mention ends, entity id there, -1 elsewhere).
    Returns (penalty [R], positive [R], rejected [R, N] bool)."""
    scores, ids = np.asarray(scores, np.float64), np.asarray(entity_ids)
    mention = ids >= 0
    rejected = mention & (scores < threshold)
    accepted = mention & ~rejected
    if kind == "count":
        return rejected.sum(-1).astype(np.float64), accepted.sum(-1).astype(np.float64), rejected
    if kind == "strength":
        penalty = np.where(rejected, threshold - scores, 0.0).sum(-1)
        return penalty, np.where(accepted, scores - threshold, 0.0).sum(-1), rejected
    raise ValueError(f"config key 'vigor.penalty' must be one of {PENALTIES}, got {kind!r}")


def select_samples(penalty: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """[B] index of the chosen sample per prompt from penalty, positive [B, n]: smallest
    penalty, then largest positive, then the earliest sample."""
    penalty, positive = np.asarray(penalty), np.asarray(positive)
    n = penalty.shape[1]
    out = np.empty(penalty.shape[0], np.int64)
    for b in range(penalty.shape[0]):
        # lexsort: the last key is the primary one
        out[b] = np.lexsort((np.arange(n), -positive[b], penalty[b]))[0]
    return out


def refine_tokens(tokens: Sequence[int], mask: Sequence[int], rejected: Sequence[bool], sentence_end: np.ndarray,
                  eos_token_id: int) -> Optional[list[int]]:
    """The response without the sentences that hold a rejected mention.

    tokens, mask, rejected [N] (rejected marks the last token of a rejected mention);
    sentence_end [V] bool (`csr.sentence_end_table`). A sentence runs up to and including a
    sentence-end token (text after the last one is a sentence too). The result keeps the
    response's EOS when it had one (a response cut by the token limit stays without).
    None when no sentence is left."""
    tokens, mask, rejected = np.asarray(tokens), np.asarray(mask) > 0, np.asarray(rejected, bool)
    n = int(mask.sum())
    toks, rej = tokens[:n], rejected[:n]
    has_eos = n > 0 and int(toks[-1]) == eos_token_id
    if has_eos:
        toks, rej = toks[:-1], rej[:-1]
    if len(toks) == 0:
        return None
    ends = sentence_end[toks].astype(np.int64)
    sentence = np.cumsum(ends) - ends
    keep = ~np.isin(sentence, sentence[rej])
    if not keep.any():
        return None
    return toks[keep].tolist() + ([eos_token_id] if has_eos else [])


def validate(config) -> None:
    """ConfigError naming the key for bad `vigor.*` / `sft.*` values."""
    if hosts.count() > 1:
        raise ConfigError(f"method 'vigor' runs as one process (one host, any number of its devices); "
                          f"this job has {hosts.count()} processes. Several hosts are for FiSAO.")
    check_section(config, "vigor", positive_ints=("num_samples", "prompt_batch_size"), non_negative=("num_prompts",),
                  choices={"threshold": THRESHOLDS, "penalty": PENALTIES})
    check_section(config, "sft", positive_ints=("epochs", "batch_size", "num_minibatches"), positive=("lr",),
                  non_negative=("weight_decay", "max_grad_norm"))


def collect(setup, config, params, threshold: float, key: jax.Array, progress: bool = True) -> tuple[dict, list, dict]:
    """Sample, score, select and refine over the first `vigor.num_prompts` prompts.

    Returns (SFT arrays {'input_ids', 'attention_mask', image inputs, 'tokens', 'mask'},
    per-prompt records for vigor_samples.jsonl, summary statistics)."""
    v, task = config.vigor, setup.task
    k = v.num_samples
    n_tokens = config.rollout.max_new_tokens
    stop = sentence_end_table(task.tokenizer, setup.module.cfg.text.vocab_size)
    keys = setup.batch_keys
    rows, records = [], []
    stats = {"prompts": 0, "skipped_empty": 0, "chosen_penalty": 0.0, "mean_penalty": 0.0, "chosen_positive": 0.0,
             "dropped_sentences_tokens": 0}
    batches = prompt_batches(task, v.num_prompts or task.num_train_prompts, v.prompt_batch_size)
    for i, (batch, n) in enumerate(tqdm(batches, desc="ViGoR sampling", unit="batch", disable=not progress,
                                        leave=False)):
        dev = setup.put_batch({key_: np.repeat(np.asarray(batch[key_]), k, axis=0) for key_ in keys})
        roll = setup.rollout_fn(params, dev, jax.random.fold_in(key, i))
        found = setup.verifier.verify_jit(setup.vstate, roll.tokens, roll.mask, dev["pixel_values"])
        toks, mask, ent, scores = (np.asarray(x) for x in (roll.tokens, roll.mask, found.entity_id, found.scores))
        penalty, positive, rejected = noun_penalties(scores, ent, threshold, v.penalty)
        b = len(batch["input_ids"])
        chosen = select_samples(penalty.reshape(b, k), positive.reshape(b, k))
        for row in range(n):
            j = row * k + int(chosen[row])
            refined = refine_tokens(toks[j], mask[j], rejected[j], stop, task.eos_token_id)
            stats["prompts"] += 1
            stats["chosen_penalty"] += float(penalty[j])
            stats["mean_penalty"] += float(penalty[row * k:(row + 1) * k].mean())
            stats["chosen_positive"] += float(positive[j])
            decode = lambda t: task.tokenizer.decode(list(t), skip_special_tokens=True).strip()  # noqa: E731
            length = int(mask[j].sum())
            records.append({"image_id": _jsonable(batch["image_ids"][row]), "selected": decode(toks[j, :length]),
                            "refined": None if refined is None else decode(refined), "penalty": float(penalty[j]),
                            "positive": float(positive[j]),
                            "rejected": [task.entity_vocab.surface_forms[e] for e in ent[j][rejected[j]]],
                            "sample_penalties": penalty[row * k:(row + 1) * k].tolist()})
            if refined is None:
                stats["skipped_empty"] += 1
                continue
            stats["dropped_sentences_tokens"] += length - len(refined)
            target = np.full(n_tokens, task.pad_token_id, np.int32)
            target_mask = np.zeros(n_tokens, np.int32)
            target[:len(refined)], target_mask[:len(refined)] = refined, 1
            rows.append({**{key_: batch[key_][row] for key_ in keys}, "tokens": target, "mask": target_mask})
    p = max(stats["prompts"], 1)
    summary = {"vigor/prompts": stats["prompts"], "vigor/targets": len(rows),
               "vigor/skipped_empty": stats["skipped_empty"], "vigor/chosen_penalty": stats["chosen_penalty"] / p,
               "vigor/mean_sample_penalty": stats["mean_penalty"] / p,
               "vigor/chosen_positive": stats["chosen_positive"] / p,
               "vigor/dropped_tokens_per_prompt": stats["dropped_sentences_tokens"] / p, "vigor/threshold": threshold}
    arrays = {k_: np.stack([r[k_] for r in rows]) for k_ in rows[0]} if rows else {}
    return arrays, records, summary


def train(config, workdir) -> dict:
    """Run (or resume) ViGoR in `workdir`; returns the summary also written to summary.json."""
    validate(config)
    run = start_run(config, workdir, "vigor")
    setup, v, s = run.setup, config.vigor, config.sft
    layout = setup.layout
    threshold = rejection_threshold(run.baseline, v.threshold, v.threshold_value)
    data_path = run.workdir / "vigor_data.npz"
    collect_stats = {}
    if data_path.exists():
        with np.load(data_path) as f:
            data = {k: f[k] for k in f.files}
    else:
        t0 = time.time()
        data, records, collect_stats = collect(setup, config, setup.params, threshold,
                                               jax.random.fold_in(jax.random.PRNGKey(config.seed), 0))
        collect_stats["time/collect"] = time.time() - t0
        if not data:
            raise RuntimeError(f"ViGoR: no prompt kept a sentence after refinement (threshold {threshold:.3f}); "
                               f"see {run.workdir / 'vigor_samples.jsonl'} and lower 'vigor.threshold'")
        atomic.write_jsonl(run.workdir / "vigor_samples.jsonl", records)
        _save_npz(data_path, data)
    optimizer = make_optimizer(s.lr, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm)
    trainable, frozen = split_params(setup.params)
    state = VigorState(trainable=trainable, opt_state=init_opt_state(optimizer, trainable, layout), step=counter(),
                       epoch=counter())
    state = layout.place(state, layout.of(state))
    if run.latest is not None:
        state = run.ckpt.restore(run.latest, state)
        print(f"resumed from {run.ckpt.directory / str(run.latest)} (epoch {int(state.epoch)})")
    start = int(state.epoch)
    chunk = s.batch_size * s.num_minibatches
    data = pad_to_multiple(data, chunk)
    update = make_sft_update(setup.module, optimizer, s.num_minibatches)
    shardings = layout.of(state)
    step = layout.jit(lambda st, fz, batch, key: st.apply(update, fz, batch, key),
                      in_shardings=(shardings, layout.of(frozen), layout.batch, layout.replicated),
                      out_shardings=(shardings, layout.replicated))
    log = MetricsLog(run.workdir, start)
    for epoch in tqdm(range(start, s.epochs), initial=start, total=s.epochs, desc="ViGoR SFT", unit="epoch"):
        t0 = time.time()
        state, upd, skipped = train_epochs(lambda st, x, k: step(st, frozen, x, k), state, data, chunk, 1,
                                           np.random.default_rng([config.seed, epoch]), layout.put_batch,
                                           jax.random.fold_in(jax.random.PRNGKey(config.seed + 4), epoch))
        state = layout.place(state.replace(epoch=counter(epoch + 1)), shardings)
        metrics = {k if k.startswith("sft/") else f"sft/{k}": x for k, x in upd.items()}
        metrics.update({"sft/nonfinite_skipped": skipped, "time/sft_epoch": time.time() - t0,
                        **(collect_stats if epoch == start else {})})
        log.write(epoch + 1, metrics)
        run.ckpt.save(epoch + 1, state)
        tqdm.write(f"ViGoR epoch {epoch + 1}: SFT loss {metrics.get('sft/loss', float('nan')):.4f}")
    log.close()
    run.ckpt.close()
    extra = {"threshold": threshold, "sft_examples": int(data["weight"].sum())}
    return finish_run(run, merge_params(state.trainable, frozen), s.epochs, SETTINGS, extra)


def _jsonable(x):
    x = x.item() if hasattr(x, "item") else x
    return x if isinstance(x, (int, float, str)) else str(x)


def _save_npz(path: pathlib.Path, arrays: dict) -> None:
    with atomic.atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
