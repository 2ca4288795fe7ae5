"""CSR (Calibrated Self-Rewarding, Zhou et al., NeurIPS 2024) on FiSAO's machinery.

    python -m fisao_jax.main --config=configs/csr_tiny.py --workdir=runs/csr_tiny

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

Workdir: as FiSAO's, plus pairs_<iteration>.jsonl (texts and scores of every pair).
Checkpoints after each iteration (the LoRA); a run resumes from the newest one.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fisao_jax import atomic
from fisao_jax.models.clip import CLIPModel, normalize
from fisao_jax.models.llama import init_cache
from fisao_jax.models.llava import LlavaModel
from fisao_jax.models.vlm import default_position_ids
from fisao_jax.rewards.verifier import encode_texts
from fisao_jax.rollout import SamplingConfig, sample_token

RESPONSE_SCORES = ("sum", "mean")


# ----------------------------------------------------------------------------- rewards


def sentence_end_table(tokenizer, vocab_size: Optional[int] = None) -> np.ndarray:
    """[V] bool: True for tokens whose text ends with '.' (special tokens never).

    V = `vocab_size` (the model's, which may exceed the tokenizer's; the extra ids are False)."""
    n = len(tokenizer)
    v = max(n, vocab_size or 0)
    special = set(tokenizer.all_special_ids)
    table = np.zeros(v, bool)
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if piece is not None and i not in special:
            table[i] = piece.replace("▁", " ").rstrip().endswith(".")
    if not table.any():
        raise ValueError(f"{type(tokenizer).__name__}: no token ends with '.', so sentences cannot be delimited")
    return table


def calibrated_reward(clip_scores, token_logprobs, mask, clip_weight: float, lm_weight: float):
    """CSR's sentence reward (paper Eqns 2-4).

    clip_scores [R]: 100 * cos(image, sentence); token_logprobs, mask [R, S] (nats).
    Returns (reward [R], R_I [R] = max(clip_scores, 0), R_T [R] = exp(sum of masked logprobs)).
    """
    r_i = jnp.maximum(jnp.asarray(clip_scores, jnp.float32), 0.0)
    r_t = jnp.exp(jnp.sum(jnp.where(jnp.asarray(mask) > 0, jnp.asarray(token_logprobs, jnp.float32), 0.0), axis=-1))
    return clip_weight * r_i + lm_weight * r_t, r_i, r_t


# ----------------------------------------------------------------------------- sentence sampler


class SentenceSample(NamedTuple):
    tokens: jax.Array    # [R, S] int32, pad after the end
    mask: jax.Array      # [R, S] int32, 1 on sampled tokens (the stop token included)
    logprobs: jax.Array  # [R, S] float32, log P(token) under the model's logits (temperature 1), nats
    hit_eos: jax.Array   # [R] bool, the continuation ended with EOS


def _sample_sentences(model: LlavaModel, cfg: SamplingConfig, max_tokens: int, params, input_ids, attention_mask,
                      image_mask, row_image, image_features, stop_table, budget, key) -> SentenceSample:
    r, t = input_ids.shape
    s = max_tokens
    cache = init_cache(model.cfg.text, r, t + s, model.dtype)
    key_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((r, s), jnp.int32)], axis=1)
    feats = image_features[row_image]
    out = model.apply({"params": params}, input_ids, None, attention_mask, default_position_ids(attention_mask),
                      cache, key_mask, use_lora=True, image_features=feats, logits_from=t - 1,
                      image_mask=image_mask, method=LlavaModel.forward)

    def pick(logits, k):
        tok, _ = sample_token(logits, k, cfg)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tok[:, None], axis=-1)
        return tok, logp[:, 0]

    def ends(tok, i):  # i = number of tokens sampled so far, this one included
        return stop_table[tok] | (tok == cfg.eos_token_id) | (i >= budget)

    key, sub = jax.random.split(key)
    tok, logp = pick(out["logits"][:, -1], sub)
    alive = budget > 0
    tok = jnp.where(alive, tok, cfg.pad_token_id)
    init = dict(step=jnp.ones((), jnp.int32), cache=out["cache"], token=tok,
                pos=jnp.sum(attention_mask, axis=-1).astype(jnp.int32), key=key,
                done=~alive | ends(tok, 1), hit_eos=alive & (tok == cfg.eos_token_id),
                tokens=jnp.full((r, s), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok),
                mask=jnp.zeros((r, s), jnp.int32).at[:, 0].set(alive.astype(jnp.int32)),
                logprobs=jnp.zeros((r, s), jnp.float32).at[:, 0].set(jnp.where(alive, logp, 0.0)))

    def cond(st):
        return (st["step"] < s) & ~jnp.all(st["done"])

    def body(st):
        o = model.apply({"params": params}, st["token"][:, None], None, jnp.ones((r, 1), jnp.int32),
                        st["pos"][:, None], st["cache"], key_mask, use_lora=True, method=LlavaModel.forward)
        k, sub = jax.random.split(st["key"])
        tok, logp = pick(o["logits"][:, -1], sub)
        alive = ~st["done"]
        tok = jnp.where(alive, tok, cfg.pad_token_id)
        i = st["step"]
        upd = lambda arr, v: jax.lax.dynamic_update_slice(arr, v[:, None].astype(arr.dtype), (0, i))  # noqa: E731
        return dict(step=i + 1, cache=o["cache"], token=tok, pos=st["pos"] + 1, key=k,
                    done=st["done"] | ends(tok, i + 1), hit_eos=st["hit_eos"] | (alive & (tok == cfg.eos_token_id)),
                    tokens=upd(st["tokens"], tok), mask=upd(st["mask"], alive.astype(jnp.int32)),
                    logprobs=upd(st["logprobs"], jnp.where(alive, logp, 0.0)))

    st = jax.lax.while_loop(cond, body, init)
    return SentenceSample(st["tokens"], st["mask"], st["logprobs"], st["hit_eos"])


def make_sentence_sampler(model: LlavaModel, cfg: SamplingConfig, max_sentence_tokens: int):
    """jitted `sample(params, input_ids [R, L], attention_mask [R, L], image_mask [R, L], row_image [R] int,
    image_features [P, n_img, D], stop_table [V] bool, budget [R] int, key) -> SentenceSample`.

    Row r continues its left-padded prefix (prompt + response so far; the features
    `image_features[row_image[r]]` go to the positions `image_mask` marks, the prompt's
    image tokens) with sampled tokens (cfg: temperature, top-k, top-p)
    until a `stop_table` token, EOS, `max_sentence_tokens` tokens or `budget[r]` tokens;
    `budget[r] = 0` samples nothing. Shapes are static: one compile per (R, L)."""
    return jax.jit(lambda *a: _sample_sentences(model, cfg, int(max_sentence_tokens), *a))


# ----------------------------------------------------------------------------- beam search


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A (partial) response: its tokens and the reward of each sentence in it."""

    tokens: tuple[int, ...]
    rewards: tuple[float, ...] = ()
    clip: tuple[float, ...] = ()   # R_I of each sentence (for logging)
    final: bool = False


class Continuation(NamedTuple):
    """What a sampler returns for one row: the new tokens, their log-probs, whether EOS ended them."""

    tokens: Sequence[int]
    logprobs: Sequence[float]
    hit_eos: bool


SampleFn = Callable[[list], list]   # rows [(prompt, Candidate) | None] -> [Continuation | None]
ScoreFn = Callable[[list, list], tuple]  # (rows, continuations) -> (reward [R], R_I [R])


def response_score(candidate: Candidate, kind: str = "sum") -> float:
    """Sum (paper) or mean (released code) of the sentence rewards; 0 without sentences."""
    if kind == "sum":
        return float(sum(candidate.rewards))
    if kind == "mean":
        return float(np.mean(candidate.rewards)) if candidate.rewards else 0.0
    raise ValueError(f"response_score kind must be one of {RESPONSE_SCORES}, got {kind!r}")


def select_beams(scores: Sequence[float], keep: int) -> np.ndarray:
    """Indices of the `keep` highest and the `keep` lowest scores (all of them when there are
    at most 2 * keep), highest first; ties keep the earlier index."""
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")
    if len(order) <= 2 * keep:
        return order
    return np.concatenate([order[:keep], order[len(order) - keep:]])


def sentence_beam_search(sample_fn: SampleFn, score_fn: ScoreFn, num_prompts: int, *, keep: int, num_candidates: int,
                         max_sentences: int, max_new_tokens: int, eos_token_id: int,
                         response_kind: str = "sum") -> list[list[Candidate]]:
    """CSR's sentence-level beam search (see the module docstring); the final candidates of
    each prompt (distinct token sequences, in the order found).

    Each step builds num_prompts * 2 * keep * num_candidates rows (static shapes): row j of
    prompt p continues beam (j // num_candidates) % len(beams); prompts without beams get
    None rows. sample_fn continues the rows; score_fn gives each continuation's sentence
    reward and R_I. Candidates still open after `max_sentences` steps are final.
    """
    width = 2 * keep * num_candidates
    beams: list[list[Candidate]] = [[Candidate(())] for _ in range(num_prompts)]
    finals: list[list[Candidate]] = [[] for _ in range(num_prompts)]
    seen: list[set] = [set() for _ in range(num_prompts)]
    for step in range(max_sentences):
        if not any(beams):
            break
        rows = [(p, beams[p][(j // num_candidates) % len(beams[p])]) if beams[p] else None
                for p in range(num_prompts) for j in range(width)]
        conts = sample_fn(rows)
        rewards, clip = score_fn(rows, conts)
        last = step == max_sentences - 1
        for p in range(num_prompts):
            open_: list[Candidate] = []
            for j in range(p * width, (p + 1) * width):
                if rows[j] is None or conts[j] is None or not len(conts[j].tokens):
                    continue
                parent, cont = rows[j][1], conts[j]
                tokens = parent.tokens + tuple(int(x) for x in cont.tokens)
                if tokens in seen[p]:
                    continue
                seen[p].add(tokens)
                eos_only = cont.hit_eos and len(cont.tokens) == 1 and int(cont.tokens[0]) == eos_token_id
                if eos_only:  # the response ends here: no new sentence
                    cand = Candidate(tokens, parent.rewards, parent.clip, True)
                else:
                    cand = Candidate(tokens, parent.rewards + (float(rewards[j]),), parent.clip + (float(clip[j]),),
                                     bool(cont.hit_eos) or len(tokens) >= max_new_tokens or last)
                (finals[p] if cand.final else open_).append(cand)
            scores = [response_score(c, response_kind) for c in open_]
            beams[p] = [open_[i] for i in select_beams(scores, keep)] if open_ else []
    return finals


def preference_pair(finals: Sequence[Candidate], kind: str = "sum") -> Optional[tuple[Candidate, Candidate]]:
    """(chosen, rejected) = the final responses with the highest and lowest score; None when
    fewer than two distinct responses exist or all scores tie. Ties: the earlier response."""
    if len(finals) < 2:
        return None
    scores = np.asarray([response_score(c, kind) for c in finals])
    hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[hi] == scores[lo]:
        return None
    return finals[hi], finals[lo]


# ----------------------------------------------------------------------------- binding to models


@dataclasses.dataclass
class SearchContext:
    """Models, jitted functions and settings of the beam search (built once per run)."""

    model: LlavaModel
    clip_module: CLIPModel
    clip_params: Any
    tokenizer: Any
    clip_tokenizer: Any
    sampler: Callable
    image_features: Callable
    image_embeddings: Callable
    encode_text: Callable
    stop_table: jax.Array
    clip_max_len: int
    eos_token_id: int
    pad_token_id: int
    keep: int
    num_candidates: int
    max_sentences: int
    max_new_tokens: int
    clip_weight: float
    lm_weight: float
    response_kind: str


def make_search_context(setup, config) -> SearchContext:
    """The beam search bound to the run's policy, verifier and tokenizers (config.csr, config.rollout)."""
    c, r = config.csr, config.rollout
    task = setup.task
    sampling = SamplingConfig(max_new_tokens=c.max_sentence_tokens, temperature=c.temperature, top_k=r.top_k,
                              top_p=r.top_p, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id)
    clip_module, model = setup.clip_module, setup.module
    encode = jax.jit(lambda p, ids, m: normalize(clip_module.apply({"params": p}, ids, m,
                                                                   method=CLIPModel.encode_text)))
    return SearchContext(
        model=model, clip_module=clip_module, clip_params=setup.clip_params, tokenizer=task.tokenizer,
        clip_tokenizer=task.clip_tokenizer, sampler=make_sentence_sampler(model, sampling, c.max_sentence_tokens),
        image_features=jax.jit(lambda p, pix: model.apply({"params": p}, pix, method=LlavaModel.image_features)),
        image_embeddings=jax.jit(lambda p, pix: normalize(clip_module.apply({"params": p}, pix,
                                                                            method=CLIPModel.encode_image))),
        encode_text=encode, stop_table=jnp.asarray(sentence_end_table(task.tokenizer, model.cfg.text.vocab_size)),
        clip_max_len=clip_module.cfg.text.max_position_embeddings, eos_token_id=task.eos_token_id,
        pad_token_id=task.pad_token_id, keep=c.beam_keep, num_candidates=c.num_candidates,
        max_sentences=c.max_sentences, max_new_tokens=r.max_new_tokens, clip_weight=c.clip_weight,
        lm_weight=c.lm_weight, response_kind=c.response_score)


def pack_prefixes(prompt_ids: np.ndarray, prompt_mask: np.ndarray, rows: list, length: int, pad_id: int,
                  image_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded (ids, mask, image_mask) [R, length] of prompt + response so far per row,
    and the prompt index [R]; image_mask marks the prompt's image tokens (never a generated
    image-token id). None rows get their prompt 0 alone."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    image = np.zeros((len(rows), length), bool)
    which = np.zeros(len(rows), np.int32)
    valid = [prompt_ids[p][prompt_mask[p] > 0] for p in range(len(prompt_ids))]
    for j, row in enumerate(rows):
        p, tokens = (0, ()) if row is None else (row[0], row[1].tokens)
        seq = np.concatenate([valid[p], np.asarray(tokens, np.int32)])
        if len(seq) > length:
            raise ValueError(f"prefix of row {j} has {len(seq)} tokens, more than {length}")
        ids[j, length - len(seq):] = seq
        mask[j, length - len(seq):] = 1
        image[j, length - len(seq):length - len(seq) + len(valid[p])] = valid[p] == image_token_id
        which[j] = p
    return ids, mask, image, which


def search_batch(ctx: SearchContext, params, batch: dict, key: jax.Array) -> list[list[Candidate]]:
    """Beam search for every prompt row of `batch` ({'input_ids', 'attention_mask', 'pixel_values'})."""
    prompt_ids, prompt_mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    pixels = jnp.asarray(batch["pixel_values"])
    feats = ctx.image_features(params, pixels)
    img = np.asarray(ctx.image_embeddings(ctx.clip_params, pixels))
    length = prompt_ids.shape[1] + ctx.max_new_tokens
    step_key = [key]

    def sample_fn(rows):
        ids, mask, image, which = pack_prefixes(prompt_ids, prompt_mask, rows, length, ctx.pad_token_id,
                                                ctx.model.cfg.image_token_id)
        budget = np.asarray([0 if row is None else ctx.max_new_tokens - len(row[1].tokens) for row in rows], np.int32)
        step_key[0], sub = jax.random.split(step_key[0])
        out = ctx.sampler(params, ids, mask, image, which, feats, ctx.stop_table, budget, sub)
        toks, m, lp, eos = (np.asarray(x) for x in out)
        res = []
        for j, row in enumerate(rows):
            n = int(m[j].sum())
            res.append(None if row is None else Continuation(toks[j, :n].tolist(), lp[j, :n].tolist(), bool(eos[j])))
        return res

    def score_fn(rows, conts):
        texts = ["" if c is None else ctx.tokenizer.decode(list(c.tokens), skip_special_tokens=True).strip()
                 for c in conts]
        ids, mask = encode_texts(ctx.clip_tokenizer, texts, ctx.clip_max_len, ctx.clip_module.cfg.text.eos_token_id)
        emb = np.asarray(ctx.encode_text(ctx.clip_params, ids, mask))
        which = np.asarray([0 if row is None else row[0] for row in rows])
        cos = np.sum(emb * img[which], axis=-1)
        clip_scores = np.where([bool(t) for t in texts], 100.0 * cos, 0.0)
        s = max((len(c.tokens) for c in conts if c is not None), default=1) or 1
        lp = np.zeros((len(conts), s), np.float32)
        m = np.zeros((len(conts), s), np.int32)
        for j, c in enumerate(conts):
            if c is not None:
                lp[j, :len(c.logprobs)] = c.logprobs
                m[j, :len(c.logprobs)] = 1
        reward, r_i, _ = calibrated_reward(clip_scores, lp, m, ctx.clip_weight, ctx.lm_weight)
        return np.asarray(reward), np.asarray(r_i)

    return sentence_beam_search(sample_fn, score_fn, len(prompt_ids), keep=ctx.keep, num_candidates=ctx.num_candidates,
                                max_sentences=ctx.max_sentences, max_new_tokens=ctx.max_new_tokens,
                                eos_token_id=ctx.eos_token_id, response_kind=ctx.response_kind)


# ----------------------------------------------------------------------------- the trainer


def validate(config) -> None:
    """ConfigError naming the key for bad `csr.*` / `dpo.*` values."""
    from fisao_jax.config_checks import ConfigError
    from fisao_jax.methods import check_section

    check_section(config, "csr",
                  positive_ints=("iterations", "beam_keep", "num_candidates", "max_sentence_tokens", "max_sentences",
                                 "prompt_batch_size"),
                  positive=("temperature",), non_negative=("clip_weight", "lm_weight", "num_prompts"),
                  choices={"response_score": RESPONSE_SCORES})
    check_section(config, "dpo", positive_ints=("epochs", "batch_size", "num_minibatches"), positive=("beta", "lr"),
                  non_negative=("weight_decay", "max_grad_norm"))
    if config.csr.clip_weight + config.csr.lm_weight <= 0:
        raise ConfigError("config keys 'csr.clip_weight' + 'csr.lm_weight' must be > 0")


def _pairs_to_arrays(pairs: list[dict], n: int, pad_id: int) -> dict:
    def tokens(key):
        toks = np.full((len(pairs), n), pad_id, np.int32)
        mask = np.zeros((len(pairs), n), np.int32)
        for i, p in enumerate(pairs):
            toks[i, :len(p[key])] = p[key]
            mask[i, :len(p[key])] = 1
        return toks, mask

    out = {k: np.stack([p[k] for p in pairs]) for k in ("input_ids", "attention_mask", "pixel_values")}
    out["chosen_tokens"], out["chosen_mask"] = tokens("chosen")
    out["rejected_tokens"], out["rejected_mask"] = tokens("rejected")
    return out


def collect_pairs(ctx: SearchContext, params, batches: list, key: jax.Array, progress: bool = True) -> list[dict]:
    """One preference pair per prompt with two distinct final responses (see `preference_pair`)."""
    from tqdm.auto import tqdm

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
            pairs.append({"input_ids": batch["input_ids"][row], "attention_mask": batch["attention_mask"][row],
                          "pixel_values": batch["pixel_values"][row], "image_id": _jsonable(batch["image_ids"][row]),
                          "chosen": list(chosen.tokens), "rejected": list(rejected.tokens),
                          "chosen_text": decode(chosen), "rejected_text": decode(rejected),
                          "chosen_score": response_score(chosen, ctx.response_kind),
                          "rejected_score": response_score(rejected, ctx.response_kind),
                          "chosen_clip": list(chosen.clip), "rejected_clip": list(rejected.clip),
                          "num_finals": len(finals[row])})
    return pairs


def train(config, workdir) -> dict:
    """Run (or resume) CSR in `workdir`; returns the summary also written to summary.json."""
    from tqdm.auto import tqdm

    from fisao_jax import methods, ppo
    from fisao_jax.methods import dpo as dpo_lib
    from fisao_jax.params import merge_params
    from fisao_jax.train import MetricsLog, replicate_unsharded

    validate(config)
    run = methods.start_run(config, workdir, "csr")
    setup, c, d = run.setup, config.csr, config.dpo
    optimizer = ppo.make_optimizer(d.lr, weight_decay=d.weight_decay, max_grad_norm=d.max_grad_norm or None)
    pstate = ppo.init_ppo_state(setup.params, optimizer)
    frozen = pstate.frozen
    state = {"trainable": pstate.trainable, "iteration": jnp.zeros((), jnp.int32)}
    if run.latest is not None:
        state = run.ckpt.restore(run.latest, state)
        print(f"resumed from {run.ckpt.directory / str(run.latest)} (iteration {int(state['iteration'])})")
    start = int(state["iteration"])
    ctx = make_search_context(setup, config)
    update = dpo_lib.make_dpo_update(setup.module, optimizer, beta=d.beta, num_minibatches=d.num_minibatches)
    ref_logprobs = dpo_lib.make_pair_logprobs(setup.module)
    num_prompts = c.num_prompts or setup.task.num_train_prompts
    batches = methods.prompt_batches(setup.task, num_prompts, c.prompt_batch_size)
    chunk = d.batch_size * d.num_minibatches
    log = MetricsLog(run.workdir, start)

    for it in tqdm(range(start, c.iterations), initial=start, total=c.iterations, desc="CSR", unit="iter"):
        params = merge_params(state["trainable"], frozen)
        t0 = time.time()
        pairs = collect_pairs(ctx, params, batches, jax.random.fold_in(jax.random.PRNGKey(config.seed), it))
        t1 = time.time()
        _write_pairs(run.workdir / f"pairs_{it + 1}.jsonl", pairs)
        metrics = {"csr/pairs": len(pairs), "csr/prompts": num_prompts, "time/beam_search": t1 - t0}
        if pairs:
            metrics.update(_pair_metrics(pairs))
            data = _pairs_to_arrays(pairs, config.rollout.max_new_tokens, setup.task.pad_token_id)
            data = methods.pad_to_multiple(data, chunk)
            data["ref_chosen_logp"], data["ref_rejected_logp"] = _reference_logprobs(ref_logprobs, params, data,
                                                                                     d.batch_size)
            dstate = ppo.PPOState(state["trainable"], frozen, optimizer.init(state["trainable"]),
                                  jnp.zeros((), jnp.int32))  # a fresh optimizer every iteration
            dstate = dstate._replace(opt_state=replicate_unsharded(dstate.opt_state, setup.mesh))
            dstate, upd, skipped = methods.train_epochs(update, dstate, data, chunk, d.epochs,
                                                        np.random.default_rng([config.seed, it]))
            state = dict(state, trainable=dstate.trainable)
            metrics.update({f"dpo/{k}": v for k, v in upd.items()})
            metrics["dpo/nonfinite_skipped"] = skipped
        metrics["time/dpo"] = time.time() - t1
        state = dict(state, iteration=jnp.asarray(it + 1, jnp.int32))
        log.write(it + 1, metrics)
        run.ckpt.save(it + 1, state)
        print(f"CSR iteration {it + 1}: {len(pairs)} pairs, chosen/rejected score "
              f"{metrics.get('csr/chosen_score', 0):.2f}/{metrics.get('csr/rejected_score', 0):.2f}, DPO loss "
              f"{metrics.get('dpo/loss', float('nan')):.4f}, accuracy {metrics.get('dpo/rewards/accuracies', 0):.2f}")
    log.close()
    run.ckpt.close()
    return methods.finish_run(run, config, merge_params(state["trainable"], frozen), c.iterations)


def _reference_logprobs(ref_logprobs, params, data: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs [P] of the chosen and rejected responses under `params`, in
    batches of `batch_size` rows (P a multiple of it)."""
    from fisao_jax.methods.dpo import PAIR_KEYS

    chosen, rejected = [], []
    for s in range(0, len(data["weight"]), batch_size):
        c, r = ref_logprobs(params, {k: jnp.asarray(data[k][s:s + batch_size]) for k in PAIR_KEYS})
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
