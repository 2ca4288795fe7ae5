"""CSR's sentence-level beam search (Zhou et al., NeurIPS 2024, Sec. 3.1-3.2) with its
calibrated sentence reward, on the policy and the verifier of the run.

Each step continues every open beam of a prompt with `num_candidates` sampled sentences (the
shared decode loop of `fisao_jax.rollout` with a sentence stop rule: a token whose text ends
with '.', EOS, `max_sentence_tokens`, or the response budget), scores every candidate
sentence s with

    R(s) = clip_weight * max(100 * cos(image, text(s)), 0) + lm_weight * R_T(s)
    R_T(s) = prod_t P(token_t | prompt, previous tokens)     (paper Eqn 2: the product)

and keeps the `beam_keep` best and `beam_keep` worst open candidates by response score (sum
or mean of its sentence rewards). Candidates that ended with EOS or used the budget are final.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fisao_jax.models.vlm import VisionLanguageModel
from fisao_jax.policy import image_features
from fisao_jax.rewards.verifier import Verifier, VerifierState
from fisao_jax.rollout import SamplingConfig, decode

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


def sentence_stop(stop_table: jax.Array, eos_token_id: int, budget: jax.Array):
    """The decode stop rule of a sentence: a sentence-end token, EOS, or the row's budget."""
    return lambda token, count: stop_table[token] | (token == eos_token_id) | (count >= budget)


def make_sentence_sampler(model: VisionLanguageModel, cfg: SamplingConfig, max_sentence_tokens: int, layout=None,
                          param_shardings=None):
    """Compiled `sample(params, input_ids [R, L], attention_mask [R, L], image_mask [R, L],
    row_image [R] int, features [P, n_img, D], stop_table [V] bool, budget [R] int, key)
    -> SentenceSample`.

    Row r continues its left-padded prefix (prompt + response so far; the features
    `features[row_image[r]]` go to the positions `image_mask` marks, the prompt's image
    tokens) with sampled tokens (cfg: temperature, top-k, top-p) until a `stop_table` token,
    EOS, `max_sentence_tokens` tokens or `budget[r]` tokens; `budget[r] = 0` samples nothing.
    Log-probs are under the model's own distribution (temperature 1), as R_T needs.
    Shapes are static: one compile per (R, L). With a `fisao_jax.placement.Layout`, the rows
    are sharded over the batch axes (R must divide by its batch shards)."""

    def sample(params, input_ids, attention_mask, image_mask, row_image, features, stop_table, budget, key):
        out = decode(model, cfg, params, input_ids, attention_mask, features[row_image], key,
                     stop=sentence_stop(stop_table, cfg.eos_token_id, budget), alive=budget > 0,
                     max_tokens=int(max_sentence_tokens), image_mask=image_mask, logprob_temperature=1.0)
        hit_eos = jnp.any((out.tokens == cfg.eos_token_id) & (out.mask > 0), axis=1)
        return SentenceSample(out.tokens, out.mask, out.logprobs, hit_eos)

    if layout is None:
        return jax.jit(sample)
    b, r = layout.batch, layout.replicated
    return layout.jit(sample, in_shardings=(param_shardings, b, b, b, b, r, r, b, r), out_shardings=b)


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
    """Models, compiled functions and settings of the beam search (built once per run)."""

    model: VisionLanguageModel
    verifier: Verifier
    vstate: VerifierState
    tokenizer: Any
    sampler: Callable
    image_features: Callable
    stop_table: jax.Array
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
    """The beam search bound to the run's policy, verifier and tokenizer (config.csr, config.rollout)."""
    c, r = config.csr, config.rollout
    task, model = setup.task, setup.module
    sampling = SamplingConfig(max_new_tokens=c.max_sentence_tokens, temperature=c.temperature, top_k=r.top_k,
                              top_p=r.top_p, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
                              decode_chunk=0)
    layout = setup.layout
    layout.check_batch_size(c.prompt_batch_size * 2 * c.beam_keep * c.num_candidates,
                            "CSR's sampler rows (csr.prompt_batch_size x 2 csr.beam_keep x csr.num_candidates)")
    return SearchContext(
        model=model, verifier=setup.verifier, vstate=setup.vstate, tokenizer=task.tokenizer,
        sampler=make_sentence_sampler(model, sampling, c.max_sentence_tokens, layout, setup.param_shardings),
        # the prompts' images (a few rows): replicated, as the features every sampler row indexes
        image_features=layout.jit(lambda p, b: image_features(model, p, b),
                                  in_shardings=(setup.param_shardings, layout.replicated),
                                  out_shardings=layout.replicated),
        stop_table=jnp.asarray(sentence_end_table(task.tokenizer, model.cfg.text.vocab_size)),
        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id, keep=c.beam_keep,
        num_candidates=c.num_candidates, max_sentences=c.max_sentences, max_new_tokens=r.max_new_tokens,
        clip_weight=c.clip_weight, lm_weight=c.lm_weight, response_kind=c.response_score)


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
    """Beam search for every prompt row of `batch` ({'input_ids', 'attention_mask', image inputs})."""
    prompt_ids, prompt_mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    images = {k: jnp.asarray(batch[k]) for k in ctx.model.image_input_keys}
    feats = ctx.image_features(params, images)
    img = ctx.verifier.image_embeddings_jit(ctx.vstate.params, images["pixel_values"])
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
        which = np.asarray([0 if row is None else row[0] for row in rows])
        clip_scores = np.asarray(ctx.verifier.sentence_scores(ctx.vstate, img[which], texts))
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
