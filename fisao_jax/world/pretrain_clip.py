"""Contrastive pretraining of the synthetic world's small CLIP, and its presence AUC.

Losses on each batch of B scenes (weights and sizes in `ClipSettings`):

* scene <-> text InfoNCE, symmetric, multi-positive: text j is a positive of scene i when
  it describes scene i exactly (same object list, or the same caption), so two scenes with
  the same objects are not pushed apart. Texts are the exact object lists, and for the
  first `caption_batch_size` scenes also their hallucination-free captions;
* presence: a sigmoid (binary) loss on `scale * cos(scene, "a photo of a {w}.") + bias` for
  every class noun and plural w, label = the class is in the scene. FiSAO's verifier
  compares 100 * cos of such texts across scenes, so presence must rank on one scale;
* patches: the same sigmoid loss between each projected patch token and the words, label
  = the object in the patch's grid cell (region-word alignment, dense supervision for the
  patch features LLaVA reads).

Texts are tokenised exactly as the verifier does (`rewards.verifier.encode_texts`: BOS,
text, EOS, EOS padding), and the text tower pools at the first EOS.
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

from fisao_jax.data.synthetic import GRID, WorldConfig, clip_object_text, plural
from fisao_jax.models import hf_io
from fisao_jax.models.clip import CLIPModel, normalize
from fisao_jax.models.configs import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from fisao_jax.rewards.verifier import encode_texts
from fisao_jax.world.configs import ClipSettings, pixel_values

MAX_LOGIT_SCALE = float(np.log(100.0))


def clip_model_config(s: ClipSettings, image_size: int, vocab_size: int, eos_token_id: int) -> CLIPConfig:
    """CLIPConfig of the world's CLIP (text tower pools at the first `eos_token_id`).

    `s.patch_size` None = image_size // 3 (one patch per grid cell)."""
    return CLIPConfig(
        vision=CLIPVisionConfig(hidden_size=s.vision_width, intermediate_size=s.vision_mlp,
                                num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                                image_size=image_size, patch_size=s.patch_size or image_size // GRID),
        text=CLIPTextConfig(vocab_size=vocab_size, hidden_size=s.text_width, intermediate_size=s.text_mlp,
                            num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                            max_position_embeddings=s.text_max_len, eos_token_id=eos_token_id,
                            argmax_pooling=False),
        projection_dim=s.projection_dim,
    )


def presence_vocabulary(world: WorldConfig) -> tuple[list[str], np.ndarray]:
    """(words, class index [W]): every class noun, then every plural, in class order."""
    words = list(world.classes) + [plural(c) for c in world.classes]
    return words, np.concatenate([np.arange(len(world.classes))] * 2)


def presence_labels(gt_objects: Sequence[frozenset], classes: Sequence[str]) -> np.ndarray:
    """float32 [n, C]: 1 where class c is in scene i."""
    return np.array([[c in gt for c in classes] for gt in gt_objects], np.float32).reshape(len(gt_objects),
                                                                                             len(classes))


def multi_positive_infonce(logits: jax.Array, positives: jax.Array) -> jax.Array:
    """Symmetric InfoNCE with several positives per row/column (their mean log-prob).

    logits [B, B] (scene i vs text j, scaled); positives [B, B] bool with a True diagonal.
    Equals the standard CLIP loss when `positives` is the identity; ln(B) at chance."""
    pos = positives.astype(jnp.float32)

    def one_side(lg, p):
        return -jnp.mean(jnp.sum(p * jax.nn.log_softmax(lg, axis=-1), axis=-1) / jnp.sum(p, axis=-1))

    return 0.5 * (one_side(logits, pos) + one_side(logits.T, pos.T))


def presence_loss(image_emb: jax.Array, word_emb: jax.Array, labels: jax.Array, scale: jax.Array,
                  bias: jax.Array) -> jax.Array:
    """Mean binary cross-entropy (nats) of sigmoid(scale * cos + bias); embeddings normalised.

    image_emb [B, D], word_emb [W, D], labels [B, W] in {0, 1}."""
    z = scale * image_emb @ word_emb.T + bias
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, labels))


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(s: ClipSettings) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) under linear warmup + cosine decay to 5% of `s.lr`."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, min(s.warmup_steps, s.steps - 1) if s.steps > 1 else 0,
                                                  max(s.steps, 1), end_value=0.05 * s.lr)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.98, weight_decay=s.weight_decay, mask=_decay_mask))


def _image_and_patch_embeddings(m: CLIPModel, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One vision pass: projected pooled embedding [B, P] (= `encode_image`) and projected
    last-layer patch tokens [B, N_patches, P] (CLS dropped), both unnormalised."""
    hidden, pooled = m.vision_model(pixel_values)
    return m.visual_projection(pooled), m.visual_projection(hidden[-1][:, 1:])


def _loss(module: CLIPModel, s: ClipSettings, trainable: dict, batch: dict):
    params, heads = trainable["params"], trainable["heads"]
    apply = functools.partial(module.apply, {"params": params})
    img, patches = apply(batch["pixels"], method=_image_and_patch_embeddings)
    img = normalize(img)
    words = normalize(apply(batch["word_ids"], batch["word_mask"], method=CLIPModel.encode_text))
    scale = jnp.exp(jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE))
    txt = normalize(apply(batch["text_ids"], batch["text_mask"], method=CLIPModel.encode_text))
    metrics = {"contrastive": multi_positive_infonce(scale * img @ txt.T, batch["positives"])}
    loss = metrics["contrastive"]
    if s.caption_batch_size:
        cap = normalize(apply(batch["caption_ids"], batch["caption_mask"], method=CLIPModel.encode_text))
        metrics["caption"] = multi_positive_infonce(scale * img[:s.caption_batch_size] @ cap.T,
                                                    batch["caption_positives"])
        loss = loss + s.caption_weight * metrics["caption"]
    metrics["presence"] = presence_loss(img, words, batch["labels"], jnp.exp(heads["presence_log_scale"]),
                                        heads["presence_bias"])
    loss = loss + s.presence_weight * metrics["presence"]
    if s.patch_weight:
        flat = normalize(patches.reshape(-1, patches.shape[-1]))
        metrics["patch"] = presence_loss(flat, words, batch["patch_labels"].reshape(flat.shape[0], -1),
                                         jnp.exp(heads["patch_log_scale"]), heads["patch_bias"])
        loss = loss + s.patch_weight * metrics["patch"]
    return loss, {**metrics, "logit_scale": scale}


def init_heads() -> dict:
    """Training-only scalars of the sigmoid losses (SigLIP-style init: scale 10, bias -5)."""
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return {"presence_log_scale": f(np.log(10.0)), "presence_bias": f(-5.0),
            "patch_log_scale": f(np.log(10.0)), "patch_bias": f(-5.0)}


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(module: CLIPModel, s: ClipSettings, state: dict, batch: dict) -> tuple[dict, dict]:
    """One AdamW step: `(state, batch) -> (state, metrics)`, compiled once per (module, settings).

    state = {'params', 'heads' (`init_heads`), 'opt'}; batch = `make_batch(...)`. Metrics
    (nats): loss, contrastive, caption, presence, patch; and logit_scale."""
    trainable = {"params": state["params"], "heads": state["heads"]}
    (loss, metrics), grads = jax.value_and_grad(functools.partial(_loss, module, s), has_aux=True)(trainable, batch)
    updates, opt = make_optimizer(s).update(grads, state["opt"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    return {**trainable, "opt": opt}, {"loss": loss, **metrics}


def init_params(module: CLIPModel, key: jax.Array) -> Any:
    """Fresh CLIP parameters (flax default init)."""
    return hf_io.init_params(module.cfg, key)


def _text_keys(texts: Sequence[str]) -> np.ndarray:
    """int64 [n]: equal texts get equal keys."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(t, len(index)) for t in texts], np.int64)


def encode_unique(tokenizer, texts: Sequence[str], max_len: int, eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`encode_texts` over the distinct texts only, gathered back: (ids, mask) [n, max_len] int32."""
    keys = _text_keys(texts)
    distinct = list(dict.fromkeys(texts))
    ids, mask = encode_texts(tokenizer, distinct, max_len, eos_token_id)
    return ids[keys], mask[keys]


def cell_labels(objects: Sequence[Sequence[Any]], classes: Sequence[str], cells: int = GRID * GRID) -> np.ndarray:
    """int32 [n, cells]: class index of the object in each grid cell, -1 where empty."""
    out = np.full((len(objects), cells), -1, np.int32)
    index = {c: i for i, c in enumerate(classes)}
    for i, objs in enumerate(objects):
        for o in objs:
            out[i, o.cell] = index[o.name]
    return out


class TrainingTexts:
    """Token ids of every text CLIP pretraining uses, computed once (texts repeat a lot)."""

    def __init__(self, s: ClipSettings, world: WorldConfig, tokenizer, data: dict, n: int, eos: int):
        self.object_ids, self.object_mask = encode_unique(tokenizer, data["clip_texts"][:n], s.object_text_len, eos)
        self.object_keys = _text_keys(data["clip_texts"][:n])
        self.caption_ids, self.caption_mask = encode_unique(tokenizer, data["clean_captions"][:n],
                                                            s.caption_text_len, eos)
        self.caption_keys = _text_keys(data["clean_captions"][:n])
        words, word_class = presence_vocabulary(world)
        self.word_ids, self.word_mask = encode_texts(tokenizer, [clip_object_text(w) for w in words], 16, eos)
        self.labels = presence_labels(data["gt_objects"][:n], world.classes)[:, word_class]
        cells = cell_labels(data["objects"][:n], world.classes)
        self.patch_labels = ((cells[:, :, None] == word_class[None, None, :]) & (cells[:, :, None] >= 0))
        self.patch_labels = self.patch_labels.astype(np.float32)


def make_batch(s: ClipSettings, texts: TrainingTexts, images: np.ndarray, idx: np.ndarray) -> dict:
    """Arrays of one step for scenes `idx` [B] (the first caption_batch_size also get captions)."""
    ok, ck = texts.object_keys[idx], texts.caption_keys[idx[:s.caption_batch_size]]
    batch = {"pixels": pixel_values(images[idx]), "text_ids": texts.object_ids[idx],
             "text_mask": texts.object_mask[idx], "positives": ok[:, None] == ok[None, :],
             "word_ids": texts.word_ids, "word_mask": texts.word_mask, "labels": texts.labels[idx],
             "patch_labels": texts.patch_labels[idx]}
    if s.caption_batch_size:
        cap = idx[:s.caption_batch_size]
        batch.update(caption_ids=texts.caption_ids[cap], caption_mask=texts.caption_mask[cap],
                     caption_positives=ck[:, None] == ck[None, :])
    return batch


def train_clip(s: ClipSettings, world: WorldConfig, tokenizer, data: dict, seed: int,
               progress: bool = True) -> tuple[CLIPModel, Any, dict]:
    """Pretrain a CLIP from scratch on `data` (a `synthetic.make_dataset` dict).

    Uses data['images'], ['clip_texts'], ['clean_captions'], ['gt_objects'], ['objects']
    (the first `s.num_scenes` scenes). Returns (module, params, history) with history =
    {'loss', 'contrastive', 'caption', 'presence', 'patch': per-step lists (nats),
    'seconds': wall time, 'cpu_seconds': process CPU time}."""
    n = min(s.num_scenes, len(data["images"]))
    if n < s.batch_size:
        raise ValueError(f"train_clip: {n} scenes is fewer than batch_size {s.batch_size}")
    start, cpu_start = time.perf_counter(), time.process_time()
    cfg = clip_model_config(s, world.image_size, len(tokenizer), int(tokenizer.eos_token_id))
    module = CLIPModel(cfg)
    state = {"params": init_params(module, jax.random.PRNGKey(seed)), "heads": init_heads()}
    state["opt"] = make_optimizer(s).init(state)
    texts = TrainingTexts(s, world, tokenizer, data, n, cfg.text.eos_token_id)
    images = data["images"][:n]
    rng = np.random.default_rng([seed, 1])
    names = ["loss", "contrastive", "caption", "presence", "patch"]
    history: dict[str, Any] = {k: [] for k in names}
    bar = tqdm.trange(s.steps, desc="CLIP pretraining", disable=not progress)
    pending = []
    for i in bar:
        idx = rng.choice(n, s.batch_size, replace=False)
        state, metrics = train_step(module, s, state, make_batch(s, texts, images, idx))
        pending.append(metrics)
        if len(pending) == 10 or i == s.steps - 1:
            for m in jax.device_get(pending):
                for k in names:
                    if k in m:
                        history[k].append(float(m[k]))
            pending = []
            bar.set_postfix({k: f"{history[k][-1]:.3f}" for k in names if history[k]})
    jax.block_until_ready(state["params"])
    history = {k: v for k, v in history.items() if v}
    history.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
    return module, state["params"], history


# ----------------------------------------------------------------------------- evaluation

@functools.partial(jax.jit, static_argnums=0)
def _encode_images(module: CLIPModel, params: Any, pixels: jax.Array) -> jax.Array:
    return normalize(module.apply({"params": params}, pixels, method=CLIPModel.encode_image))


def image_embeddings(module: CLIPModel, params: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Normalised image embeddings [n, D] float32 of uint8 scenes [n, S, S, 3]."""
    encode = functools.partial(_encode_images, module)
    out = []
    for s in range(0, len(images), batch_size):
        chunk = pixel_values(images[s:s + batch_size])
        pad = batch_size - len(chunk) if len(images) > batch_size else 0
        out.append(np.asarray(encode(params, np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)))))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, module.cfg.projection_dim), np.float32)


def text_embeddings(module: CLIPModel, params: Any, tokenizer, texts: Sequence[str], max_len: int = 16) -> np.ndarray:
    """Normalised text embeddings [n, D] float32 (verifier tokenisation)."""
    ids, mask = encode_texts(tokenizer, texts, max_len, module.cfg.text.eos_token_id)
    out = module.apply({"params": params}, ids, mask, method=CLIPModel.encode_text)
    return np.asarray(normalize(out))


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    positive, negative = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if not len(positive) or not len(negative):
        raise ValueError(f"roc_auc needs both classes, got {len(positive)} positives and {len(negative)} negatives")
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first, counts):
        if c > 1:
            ranks[order[f:f + c]] = f + (c + 1) / 2.0
    u = ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2.0
    return float(u / (len(positive) * len(negative)))


def evaluate_presence(module: CLIPModel, params: Any, tokenizer, world: WorldConfig, data: dict,
                      template: Optional[str] = None) -> dict:
    """Verifier quality on held-out scenes: scores 100 * cos(f_T("a photo of a {w}."), f_I(scene)).

    Returns {'auc': pooled over all (scene, class) pairs with the class noun, 'auc_plural':
    the same with plurals, 'partner_auc': partner present vs absent among scenes holding its
    anchor (the pairs FiSAO must tell apart), 'mean_present' / 'mean_absent' scores,
    'num_scenes'}."""
    words, word_class = presence_vocabulary(world)
    texts = [clip_object_text(w) if template is None else template.format(w) for w in words]
    img = image_embeddings(module, params, data["images"])
    scores = 100.0 * img @ text_embeddings(module, params, tokenizer, texts).T  # [n, W]
    labels = presence_labels(data["gt_objects"], world.classes)[:, word_class] > 0
    c = len(world.classes)
    sing, plur = scores[:, :c], scores[:, c:]
    lab = labels[:, :c]
    partner_pos, partner_neg = [], []
    for anchor, partner in world.cooccurrence:
        a, p = world.classes.index(anchor), world.classes.index(partner)
        rows = lab[:, a]
        partner_pos.append(sing[rows & lab[:, p], p])
        partner_neg.append(sing[rows & ~lab[:, p], p])
    pp, pn = np.concatenate(partner_pos), np.concatenate(partner_neg)
    return {
        "auc": roc_auc(sing[lab], sing[~lab]),
        "auc_plural": roc_auc(plur[lab], plur[~lab]),
        "partner_auc": roc_auc(pp, pn) if len(pp) and len(pn) else float("nan"),
        "mean_present": float(sing[lab].mean()),
        "mean_absent": float(sing[~lab].mean()),
        "num_scenes": int(len(data["images"])),
    }
