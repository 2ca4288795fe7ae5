"""Supervised fine-tuning of the synthetic world's small LLaVA on the biased captions.

The model is LLaVA-1.5 in miniature: the pretrained CLIP's vision tower (frozen; its
features at `vision_feature_layer` are computed once per scene), a fresh 2-layer GELU
projector and a fresh LLaMA, the latter two trained on

    <s> USER: <image>x N\\n{prompt} ASSISTANT: {biased caption}</s>

with the loss (nats per token) on the caption tokens and the EOS only. A training row is
laid out exactly like a rollout: the prompt left-padded to a fixed length, then the
response right-padded to a bucket length, so the model sees the positions it is later
decoded at.

`caption_metrics` measures what the SFT model learnt: object precision / recall, CHAIR, and
how often it names an absent partner next to a present anchor (the language prior).
"""
from __future__ import annotations

import functools
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from fisao_jax.data.prompts import encode_prompts, format_prompt
from fisao_jax.data.synthetic import WorldConfig, chair_synonym_lines, prompt_text
from fisao_jax.eval import chair
from fisao_jax.models import hf_io
from fisao_jax.models.configs import CLIPConfig, LlamaConfig, LlavaConfig
from fisao_jax.models.llava import LlavaModel
from fisao_jax.policy import response_logprobs, token_mean_nll
from fisao_jax.rollout import SamplingConfig, make_rollout
from fisao_jax.update import make_minibatch_update
from fisao_jax.world.configs import SftSettings, pixel_values

TRAINED_KEYS = ("multi_modal_projector", "language_model", "lm_head")
"""Top-level parameter groups the SFT trains (the vision tower and value head stay fixed)."""


def special_ids(tokenizer) -> dict:
    """{'image', 'pad', 'bos', 'eos'} token ids of a world tokenizer; raises if one is missing."""
    ids = {"image": tokenizer.convert_tokens_to_ids("<image>"), "pad": tokenizer.pad_token_id,
           "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    bad = [k for k, v in ids.items() if v is None or (k == "image" and v == tokenizer.unk_token_id)]
    if bad:
        raise ValueError(f"tokenizer lacks the special token(s) {bad} (expected <image>, <pad>, <s>, </s>)")
    return {k: int(v) for k, v in ids.items()}


def llava_model_config(s: SftSettings, clip_cfg: CLIPConfig, tokenizer) -> LlavaConfig:
    """LlavaConfig: the CLIP's vision tower + a LLaMA of the SFT sizes over the tokenizer's vocabulary."""
    ids = special_ids(tokenizer)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       max_position_embeddings=s.max_position_embeddings, rms_norm_eps=1e-5,
                       bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    return LlavaConfig(vision=clip_cfg.vision, text=text, image_token_id=ids["image"],
                       vision_feature_layer=s.vision_feature_layer, vision_feature_select_strategy="default")


def init_llava_params(cfg: LlavaConfig, clip_params: Any, key: jax.Array) -> dict:
    """Fresh projector / LLaMA / value head, vision tower copied from `clip_params['vision_model']`."""
    params = dict(hf_io.init_params(cfg, key))
    vision = clip_params["vision_model"]
    want = jax.tree.map(lambda x: (x.shape, x.dtype), params["vision_tower"])
    got = jax.tree.map(lambda x: (x.shape, x.dtype), vision)
    if want != got:
        raise ValueError("the CLIP vision tower does not fit the LLaVA config (shapes differ)")
    params["vision_tower"] = vision
    return params


def _tower_features(m: LlavaModel, pixel_values):
    return m.select_features(m.vision_hidden_states(pixel_values))


@functools.partial(jax.jit, static_argnums=0)
def _run_tower(module: LlavaModel, params: Any, pixels: jax.Array) -> jax.Array:
    return module.apply({"params": params}, pixels, method=_tower_features)


def vision_features(module: LlavaModel, params: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Frozen-tower features before the projector: uint8 scenes [n,S,S,3] -> float32 [n, N_img, D_vision]."""
    run = functools.partial(_run_tower, module)
    vision_only = {"vision_tower": params["vision_tower"]}
    out = []
    for s in range(0, len(images), batch_size):
        chunk = pixel_values(images[s:s + batch_size])
        pad = batch_size - len(chunk) if len(images) > batch_size else 0
        out.append(np.asarray(run(vision_only, np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))))[:len(chunk)])
    return np.concatenate(out)


def _project(m: LlavaModel, features):
    """Precomputed tower features [B, N_img, D_vision] through the (trained) projector."""
    return m.multi_modal_projector(features)


def prompt_texts(prompts: Sequence[str], system: Optional[str]) -> list[str]:
    """Instructions in the LLaVA-1.5 template (with the <image> placeholder)."""
    return [format_prompt(p, system=system) for p in prompts]


def prompt_length(tokenizer, cfg: LlavaConfig, prompts: Sequence[str], system: Optional[str]) -> int:
    """Token length of the longest formatted prompt, image tokens included."""
    ids, _ = encode_prompts(tokenizer, prompt_texts(list(dict.fromkeys(prompts)), system), cfg.image_token_id,
                            cfg.num_image_tokens)
    return int(ids.shape[1])


def encode_prompt_batch(tokenizer, cfg: LlavaConfig, prompts: Sequence[str], system: Optional[str],
                        length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids / mask, int32 [n, length], as generation expects them."""
    return encode_prompts(tokenizer, prompt_texts(prompts, system), cfg.image_token_id, cfg.num_image_tokens,
                          max_len=length)


def encode_responses(tokenizer, captions: Sequence[str], eos_token_id: int) -> list[list[int]]:
    """Caption token ids (no BOS) followed by EOS."""
    return [list(ids) + [eos_token_id] for ids in tokenizer(list(captions), add_special_tokens=False)["input_ids"]]


def make_buckets(prompt_ids: np.ndarray, prompt_mask: np.ndarray, responses: Sequence[Sequence[int]],
                 buckets: Sequence[int], pad_id: int) -> tuple[dict, int]:
    """Rows grouped by the smallest response bucket that holds them.

    Returns ({bucket: {'rows' [n] scene indices, 'input_ids' / 'attention_mask' /
    'loss_mask' int32 [n, P + bucket]}}, number of rows dropped for being too long).
    loss_mask is 1 on response tokens (EOS included)."""
    lengths = np.array([len(r) for r in responses])
    which = np.searchsorted(np.asarray(buckets), lengths)  # first bucket >= length
    out = {}
    p = prompt_ids.shape[1]
    for b_i, size in enumerate(buckets):
        rows = np.nonzero(which == b_i)[0]
        if not len(rows):
            continue
        ids = np.full((len(rows), p + size), pad_id, np.int32)
        mask = np.zeros_like(ids)
        loss = np.zeros_like(ids)
        ids[:, :p], mask[:, :p] = prompt_ids[rows], prompt_mask[rows]
        for j, r in enumerate(rows):
            n = lengths[r]
            ids[j, p:p + n] = responses[r]
            mask[j, p:p + n] = 1
            loss[j, p:p + n] = 1
        out[size] = {"rows": rows, "input_ids": ids, "attention_mask": mask, "loss_mask": loss}
    return out, int((which >= len(buckets)).sum())


def make_optimizer(s: SftSettings) -> optax.GradientTransformation:
    """AdamW (decay on matrices) with linear warmup and cosine decay to 5% of `s.lr`."""
    warmup = min(s.warmup_steps, s.steps - 1) if s.steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, max(s.steps, 1), end_value=0.05 * s.lr)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.98, weight_decay=s.weight_decay,
                                   mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))


def _loss(module: LlavaModel, p: int, params: dict, batch: dict) -> tuple[jax.Array, dict]:
    """Token-mean NLL of the caption tokens; the prompt is the first `p` columns of a row."""
    feats = module.apply({"params": params}, batch["features"], method=_project)
    prompt = {"input_ids": batch["input_ids"][:, :p], "attention_mask": batch["attention_mask"][:, :p]}
    logp = response_logprobs(module, params, prompt, batch["input_ids"][:, p:], batch["loss_mask"][:, p:],
                             features=feats)["logprobs"]
    loss, _ = token_mean_nll(logp, batch["loss_mask"][:, p:])
    return loss, {"loss": jax.lax.stop_gradient(loss)}


@functools.lru_cache(maxsize=4)
def train_step(module: LlavaModel, s: SftSettings, prompt_len: int):
    """Compiled `step(trainable, opt_state, step, frozen, batch) -> (trainable, opt_state, step,
    metrics)`: one AdamW step (the shared update, `fisao_jax.update`; a non-finite step is
    skipped), compiled once per (module, settings, shapes).

    batch: 'input_ids', 'attention_mask', 'loss_mask' [B,T] int32, 'features' [B,N_img,D_vision]."""
    update = make_minibatch_update(functools.partial(_loss, module, prompt_len), make_optimizer(s), num_minibatches=1)
    return jax.jit(lambda tr, opt, st, fz, batch: update(tr, opt, st, fz, batch, None)[:4])


def train_sft(s: SftSettings, clip_module: Any, clip_params: Any, tokenizer, data: dict, seed: int,
              progress: bool = True) -> tuple[LlavaModel, dict, dict]:
    """Train projector + LLaMA on the first `s.num_scenes` scenes of `data` (a make_dataset dict).

    Uses data['images'], ['captions'] (biased) and ['prompts'] (or the default prompt when
    `s.paraphrase_prompts` is off). Returns (module, params, history) with history =
    {'loss': per-step nats, 'dropped': rows longer than the last bucket, 'prompt_len',
    'seconds': wall time, 'cpu_seconds': process CPU time}."""
    start, cpu_start = time.perf_counter(), time.process_time()
    n = min(s.num_scenes, len(data["images"]))
    cfg = llava_model_config(s, clip_module.cfg, tokenizer)
    module = LlavaModel(cfg)
    params = init_llava_params(cfg, clip_params, jax.random.PRNGKey(seed))
    ids = special_ids(tokenizer)

    prompts = list(data["prompts"][:n]) if s.paraphrase_prompts else [prompt_text()] * n
    p_len = prompt_length(tokenizer, cfg, prompts, s.system)
    prompt_ids, prompt_mask = encode_prompt_batch(tokenizer, cfg, prompts, s.system, p_len)
    responses = encode_responses(tokenizer, data["captions"][:n], ids["eos"])
    buckets, dropped = make_buckets(prompt_ids, prompt_mask, responses, s.response_buckets, ids["pad"])
    if not buckets:
        raise ValueError(f"train_sft: every caption is longer than the largest response bucket "
                         f"{s.response_buckets[-1]} tokens")
    features = vision_features(module, params, data["images"][:n])

    trainable = {k: params[k] for k in TRAINED_KEYS if k in params}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    opt_state = make_optimizer(s).init(trainable)
    step = jnp.zeros((), jnp.int32)
    run_step = train_step(module, s, p_len)
    rng = np.random.default_rng([seed, 2])
    sizes = sorted(buckets)
    weights = np.array([len(buckets[b]["rows"]) for b in sizes], np.float64)
    history: dict[str, Any] = {"loss": []}
    pending = []
    bar = tqdm.trange(s.steps, desc="LLaVA SFT", disable=not progress)
    for i in bar:
        size = sizes[rng.choice(len(sizes), p=weights / weights.sum())]
        bucket = buckets[size]
        pick = rng.choice(len(bucket["rows"]), s.batch_size, replace=len(bucket["rows"]) < s.batch_size)
        batch = {k: bucket[k][pick] for k in ("input_ids", "attention_mask", "loss_mask")}
        batch["features"] = features[bucket["rows"][pick]]
        trainable, opt_state, step, metrics = run_step(trainable, opt_state, step, frozen, batch)
        pending.append(metrics["loss"])
        if len(pending) == 10 or i == s.steps - 1:
            history["loss"] += [float(x) for x in jax.device_get(pending)]
            pending = []
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    params = {**frozen, **jax.block_until_ready(trainable)}
    history.update(dropped=dropped, prompt_len=p_len, seconds=time.perf_counter() - start,
                   cpu_seconds=time.process_time() - cpu_start)
    return module, params, history


# ----------------------------------------------------------------------------- generation and metrics

def generate_captions(module: LlavaModel, params: Any, tokenizer, images: np.ndarray, prompts: Sequence[str],
                      system: Optional[str], prompt_len: int, max_new_tokens: int, greedy: bool = True,
                      seed: int = 0, batch_size: int = 64) -> list[str]:
    """Decoded responses (special tokens skipped) for uint8 scenes [n,S,S,3] and their prompts."""
    ids = special_ids(tokenizer)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, greedy=greedy, eos_token_id=ids["eos"],
                         pad_token_id=ids["pad"])
    rollout = _rollout(module, cfg)
    key = jax.random.PRNGKey(seed)
    texts: list[str] = []
    for s in range(0, len(images), batch_size):
        chunk = slice(s, min(s + batch_size, len(images)))
        n = chunk.stop - chunk.start
        pad = batch_size - n if len(images) > batch_size else 0
        p_ids, p_mask = encode_prompt_batch(tokenizer, module.cfg, list(prompts[chunk]) + [prompts[0]] * pad,
                                            system, prompt_len)
        pix = pixel_values(np.concatenate([images[chunk], np.repeat(images[:1], pad, axis=0)]))
        key, sub = jax.random.split(key)
        out = rollout(params, {"input_ids": p_ids, "attention_mask": p_mask, "pixel_values": pix}, sub)
        tokens, mask = np.asarray(out.tokens)[:n], np.asarray(out.mask)[:n]
        texts += [tokenizer.decode(t[m > 0], skip_special_tokens=True).strip() for t, m in zip(tokens, mask)]
    return texts


@functools.lru_cache(maxsize=4)
def _rollout(module: LlavaModel, cfg: SamplingConfig):
    """One compiled rollout per (model config, sampling config) in this process."""
    return make_rollout(module, cfg)


def caption_metrics(captions: Sequence[str], gt_objects: Sequence[frozenset], world: WorldConfig) -> dict:
    """Object metrics of captions against ground truth, words matched with CHAIR on the world's nouns.

    Returns {'CHAIRs', 'CHAIRi', 'Recall' (percent, CHAIR's definitions), 'precision'
    (correct / all object mentions; 0 without mentions), 'object_precision' / 'object_recall' (over distinct
    objects per caption), 'partner_rate' (fraction of (scene, pair) cases with the anchor
    present and its partner absent in which the caption names the partner), 'partner_cases',
    'num_captions'}."""
    vocab = chair.vocab_from_synonym_lines(chair_synonym_lines(world))
    gt = {i: set(g) for i, g in enumerate(gt_objects)}
    scores = chair.chair_scores([{"image_id": i, "caption": c} for i, c in enumerate(captions)], gt, vocab)
    mentioned = [{node for _, node in s["mentioned_objects"]} for s in scores["sentences"]]
    n_mentioned = sum(len(m) for m in mentioned)
    n_correct = sum(len(m & gt[i]) for i, m in enumerate(mentioned))
    n_gt = sum(len(g) for g in gt.values())
    cases = hits = 0
    for i, g in gt.items():
        for anchor, partner in world.cooccurrence:
            if anchor in g and partner not in g:
                cases += 1
                hits += partner in mentioned[i]
    return {
        "CHAIRs": scores["CHAIRs"], "CHAIRi": scores["CHAIRi"], "Recall": scores["Recall"],
        "precision": 1.0 - scores["CHAIRi"] / 100.0 if n_mentioned else 0.0,
        "object_precision": n_correct / n_mentioned if n_mentioned else 0.0,
        "object_recall": n_correct / n_gt if n_gt else 0.0,
        "partner_rate": hits / cases if cases else float("nan"),
        "partner_cases": cases,
        "num_captions": len(captions),
    }
