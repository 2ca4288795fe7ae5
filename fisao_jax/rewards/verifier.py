"""The fine-grained verifier: the policy's own vision-language encoder scoring entity words.

    score(word, image) = 100 * max_q cos(f_T(template(word)), f_I(image)_q)     (SPEC step 2)

For CLIP (LLaVA's verifier) the image side is one embedding (Q = 1): the plain cosine. For
BLIP-2's image-text contrastive head (InstructBLIP's) it is the Q query embeddings and the
score takes the best query. The text side is a table [num_surface_forms, D] of normalised
embeddings, computed once per run and cached on disk under a key made of the checkpoint id,
the template and the vocabulary. Span scores are a gather of the table at each span end and a
dot product: no text forward in the hot path.

`Verifier` is built once per run: it holds the verifier model, tokenizer and template, and
compiles `verify(state, tokens, mask, pixel_values)` once; its arrays (params, text table,
span table) travel as a `VerifierState` pytree.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fisao_jax import atomic, hosts
from fisao_jax.models.clip import normalize
from fisao_jax.rewards.spans import SpanTable, find_entity_span_bounds

DEFAULT_TEMPLATE = "a photo of a {}."


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise for a causal text tower that pools at the EOS (CLIP): (ids [N, max_len] int32,
    mask [N, max_len] int32).

    Every row ends with `eos_token_id` (appended when the tokenizer does not add it; long
    texts are truncated to keep it) and is right-padded with it too, as CLIP's own tokenizer
    does: padding then never moves the pooling position, under either pooling rule."""
    ids = np.full((len(texts), max_len), eos_token_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
        toks = list(tokenizer(text)["input_ids"])
        if not toks or toks[-1] != eos_token_id:
            toks.append(eos_token_id)
        if len(toks) > max_len:
            toks = toks[: max_len - 1] + [eos_token_id]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
    return ids, mask


def image_embeddings(module: Any, params: Any, pixel_values: jax.Array) -> jax.Array:
    """Normalised image embeddings [N, Q, D] float32 (CLIP: Q = 1) from pixels [N, 3, H, W]."""
    emb = normalize(module.apply({"params": params}, pixel_values, method=module.encode_image))
    return emb[:, None, :] if emb.ndim == 2 else emb


def text_encoder(module: Any):
    """A compiled `encode(params, ids [N, L], mask [N, L]) -> [N, D]` normalised text embeddings."""
    return jax.jit(lambda p, i, m: normalize(module.apply({"params": p}, i, m, method=module.encode_text)))


def text_embeddings(module: Any, params: Any, tokenizer, texts: Sequence[str], batch_size: int = 256,
                    max_len: Optional[int] = None, progress: bool = False, encode=None) -> np.ndarray:
    """Normalised text embeddings [N, D] float32 for `texts` (fixed-size batches through
    `encode`, default a new `text_encoder(module)`: pass one to reuse its compilation)."""
    cfg = module.cfg.text
    max_len = max_len or cfg.max_position_embeddings
    ids, mask = encode_texts(tokenizer, texts, max_len, cfg.eos_token_id)
    # The causal text tower pools at the EOS: trailing padding changes nothing, so cut it
    # (to a multiple of 8, to bound the number of compiled shapes).
    longest = int(mask.sum(axis=1).max()) if len(texts) else 1
    keep = min(max_len, -(-longest // 8) * 8)
    ids, mask = ids[:, :keep], mask[:, :keep]
    encode = encode or text_encoder(module)
    out = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="entity text embeddings", unit="batch", leave=False)
    for s in starts:
        n = min(batch_size, len(texts) - s)
        pad = batch_size - n if len(texts) > batch_size else 0
        bi = np.pad(ids[s:s + n], ((0, pad), (0, 0)))
        bm = np.pad(mask[s:s + n], ((0, pad), (0, 0)))
        out.append(hosts.gather(encode(params, bi, bm))[:n])
    return np.concatenate(out, axis=0) if out else np.zeros((0, module.cfg.projection_dim), np.float32)


def table_cache_key(checkpoint_id: str, template: str, surface_forms: Sequence[str], max_len: int) -> str:
    """Hex digest identifying an entity table: checkpoint, template, vocabulary, text length."""
    h = hashlib.sha256()
    h.update(json.dumps([checkpoint_id, template, max_len, list(surface_forms)]).encode())
    return h.hexdigest()[:20]


def entity_text_table(module: Any, params: Any, tokenizer, surface_forms: Sequence[str],
                      template: str = DEFAULT_TEMPLATE, cache_dir: Optional[os.PathLike] = None,
                      checkpoint_id: str = "", max_len: Optional[int] = None, batch_size: int = 256,
                      progress: bool = True, encode=None) -> jax.Array:
    """[E, D] normalised embeddings of `template.format(form)` for every surface form.

    With `cache_dir`, the table is read from / written to
    `cache_dir/entity_table_<key>.npy`, key = `table_cache_key(checkpoint_id, ...)`; pass a
    `checkpoint_id` that changes whenever the verifier's weights change (`checkpoint_id(path)`)."""
    if "{}" not in template:
        raise ValueError(f"verifier template must contain '{{}}', got {template!r}")
    max_len = max_len or module.cfg.text.max_position_embeddings
    path = None
    if cache_dir is not None:
        key = table_cache_key(checkpoint_id, template, surface_forms, max_len)
        path = pathlib.Path(cache_dir) / f"entity_table_{key}.npy"
        if path.exists():
            table = np.load(path)
            if table.shape[0] != len(surface_forms):
                raise ValueError(f"cached entity table {path} has {table.shape[0]} rows, "
                                 f"expected {len(surface_forms)}: delete it to recompute")
            return jnp.asarray(table)
    texts = [template.format(f) for f in surface_forms]
    table = text_embeddings(module, params, tokenizer, texts, batch_size, max_len, progress=progress, encode=encode)
    if path is not None:
        with atomic.atomic_path(path) as tmp:
            np.save(tmp, table)
    return jnp.asarray(table)


def checkpoint_id(path: os.PathLike) -> str:
    """A string that changes when the checkpoint at `path` changes (config + weight file sizes/mtimes)."""
    p = pathlib.Path(path).resolve()
    parts = [str(p)]
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.relative_to(p)}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def span_scores(image_emb: jax.Array, text_table: jax.Array, entity_ids: jax.Array) -> jax.Array:
    """[B, T] float32 verifier scores 100 * max_q cos at span ends (entity_ids >= 0), 0 elsewhere.

    image_emb [B, Q, D] and text_table [E, D] are normalised; entity_ids [B, T] index the table."""
    rows = text_table[jnp.clip(entity_ids, 0, text_table.shape[0] - 1)]  # [B, T, D]
    cos = jnp.einsum("btd,bqd->btq", rows.astype(jnp.float32), image_emb.astype(jnp.float32)).max(-1)
    return jnp.where(entity_ids >= 0, 100.0 * cos, 0.0)


def word_scores(image_emb: jax.Array, text_table: jax.Array) -> jax.Array:
    """[B, E] scores of every entity against every image (for calibration and plots)."""
    return 100.0 * jnp.einsum("bqd,ed->beq", image_emb.astype(jnp.float32), text_table.astype(jnp.float32)).max(-1)


def text_scores(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """[B] 100 * max_q cos(image_b, text_b) of paired images [B, Q, D] and texts [B, D]."""
    return 100.0 * jnp.einsum("bqd,bd->bq", image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)).max(-1)


def cut_spans(entity_ids: jax.Array, tokens: jax.Array, mask: jax.Array, eos_token_id: int) -> jax.Array:
    """entity_ids [B, N] without the spans that end at the last token of a response cut by the
    token budget (every slot used, no EOS): the word or the multi-word entity may go on past
    the cut ("cat" of "caterpillar", "baseball" of "baseball bat"), so it is not scored."""
    n = mask.shape[1]
    length = jnp.sum(mask > 0, axis=1)
    last = jnp.take_along_axis(tokens, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    cut = (length == n) & (last != eos_token_id)
    at_cut = cut[:, None] & (jnp.arange(n)[None, :] == n - 1)
    return jnp.where(at_cut, -1, entity_ids)


class VerifierState(struct.PyTreeNode):
    """The verifier's arrays: model params, entity text table [E, D], span table."""

    params: Any
    text_table: jax.Array
    span_table: SpanTable


class Verified(NamedTuple):
    """entity_id, start [B, N] int32 (-1 off span ends), scores [B, N] (0 off span ends),
    image_emb [B, Q, D] normalised."""

    entity_id: jax.Array
    start: jax.Array
    scores: jax.Array
    image_emb: jax.Array


class Verifier:
    """The verifier of a run (see the module docstring): `module` has `encode_image` and
    `encode_text`; `eos_token_id` is the policy's, to tell finished responses from ones cut by
    the token budget (None: every response counts as finished)."""

    def __init__(self, module: Any, tokenizer, template: str = DEFAULT_TEMPLATE, eos_token_id: Optional[int] = None,
                 max_span_len: Optional[int] = None):
        self.module, self.tokenizer, self.template = module, tokenizer, template
        self.eos_token_id, self.max_span_len = eos_token_id, max_span_len
        self.verify_jit = jax.jit(self.verify)
        self.image_embeddings_jit = jax.jit(self.image_embeddings)
        self.encode_text = text_encoder(module)

    def image_embeddings(self, params: Any, pixel_values: jax.Array) -> jax.Array:
        return image_embeddings(self.module, params, pixel_values)

    def verify(self, state: VerifierState, tokens: jax.Array, mask: jax.Array, pixel_values: jax.Array,
               image_emb: Optional[jax.Array] = None) -> Verified:
        """Spans of entity words in the responses `tokens`, `mask` [B, N] and their scores
        against the images `pixel_values` [B, 3, H, W] (or their precomputed `image_emb`)."""
        spans = find_entity_span_bounds(tokens, mask, state.span_table, max_span_len=self.max_span_len)
        ids = spans.entity_id
        if self.eos_token_id is not None:
            ids = cut_spans(ids, tokens, mask, self.eos_token_id)
        if image_emb is None:
            image_emb = self.image_embeddings(state.params, pixel_values)
        scores = span_scores(image_emb, state.text_table, ids)
        return Verified(ids, jnp.where(ids >= 0, spans.start, -1), scores, image_emb)

    def sentence_scores(self, state: VerifierState, image_emb: jax.Array, texts: Sequence[str]) -> jax.Array:
        """[B] scores of whole responses against their images (the sentence-level ablation);
        texts longer than the text tower's context are truncated (its own limit)."""
        emb = text_embeddings(self.module, state.params, self.tokenizer, list(texts), batch_size=max(len(texts), 1),
                              encode=self.encode_text)
        scores = text_scores(image_emb, jnp.asarray(emb))
        return jnp.where(jnp.asarray([bool(t) for t in texts]), scores, 0.0)  # an empty text scores 0

    def entity_table(self, params: Any, surface_forms: Sequence[str], cache_dir: Optional[os.PathLike] = None,
                     checkpoint_id: str = "") -> jax.Array:
        """`entity_text_table` with this verifier's model, tokenizer, template and encoder."""
        return entity_text_table(self.module, params, self.tokenizer, surface_forms, self.template,
                                 cache_dir=cache_dir, checkpoint_id=checkpoint_id, encode=self.encode_text)
