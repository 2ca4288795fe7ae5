"""The fine-grained verifier: the policy's own CLIP scoring entity words against the image.

score(word, image) = 100 * cos(f_T(template(word)), f_I(image))   (SPEC step 2)

The text side is a table [num_surface_forms, D] of normalised embeddings, computed once per
run and cached on disk under a key made of the checkpoint id, the template and the
vocabulary. The image side is one CLIP vision pass per image. Span scores are a gather of
the table at each span end followed by a dot product: no text forward in the hot path.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fisao_jax import atomic
from fisao_jax.models.clip import CLIPModel, normalize

DEFAULT_TEMPLATE = "a photo of a {}."


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise for the CLIP text tower: (ids [N, max_len] int32, mask [N, max_len] int32).

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


def text_embeddings(module: CLIPModel, params: Any, tokenizer, texts: Sequence[str],
                    batch_size: int = 256, max_len: Optional[int] = None, progress: bool = False) -> np.ndarray:
    """Normalised CLIP text embeddings [N, D] float32 for `texts` (fixed-size jitted batches)."""
    cfg = module.cfg.text
    max_len = max_len or cfg.max_position_embeddings
    ids, mask = encode_texts(tokenizer, texts, max_len, cfg.eos_token_id)
    # The causal text tower pools at the EOS: trailing padding changes nothing, so cut it
    # (to a multiple of 8, to bound the number of compiled shapes).
    longest = int(mask.sum(axis=1).max()) if len(texts) else 1
    keep = min(max_len, -(-longest // 8) * 8)
    ids, mask = ids[:, :keep], mask[:, :keep]
    encode = jax.jit(lambda p, i, m: normalize(module.apply({"params": p}, i, m, method=CLIPModel.encode_text)))
    out = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="entity text embeddings", unit="batch")
    for s in starts:
        n = min(batch_size, len(texts) - s)
        pad = batch_size - n if len(texts) > batch_size else 0
        bi = np.pad(ids[s:s + n], ((0, pad), (0, 0)))
        bm = np.pad(mask[s:s + n], ((0, pad), (0, 0)))
        out.append(np.asarray(encode(params, bi, bm))[:n])
    return np.concatenate(out, axis=0) if out else np.zeros((0, module.cfg.projection_dim), np.float32)


def table_cache_key(checkpoint_id: str, template: str, surface_forms: Sequence[str], max_len: int) -> str:
    """Hex digest identifying an entity table: checkpoint, template, vocabulary, text length."""
    h = hashlib.sha256()
    h.update(json.dumps([checkpoint_id, template, max_len, list(surface_forms)]).encode())
    return h.hexdigest()[:20]


def entity_text_table(module: CLIPModel, params: Any, tokenizer, surface_forms: Sequence[str],
                      template: str = DEFAULT_TEMPLATE, cache_dir: Optional[os.PathLike] = None,
                      checkpoint_id: str = "", max_len: Optional[int] = None, batch_size: int = 256,
                      progress: bool = True) -> jax.Array:
    """[E, D] normalised embeddings of `template.format(form)` for every surface form.

    With `cache_dir`, the table is read from / written to
    `cache_dir/entity_table_<key>.npy`, key = `table_cache_key(checkpoint_id, ...)`; pass a
    `checkpoint_id` that changes whenever the CLIP weights change (e.g. `checkpoint_id(path)`)."""
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
    table = text_embeddings(module, params, tokenizer, texts, batch_size, max_len, progress=progress)
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


def image_embeddings(module: CLIPModel, params: Any, pixel_values: jax.Array) -> jax.Array:
    """Normalised CLIP image embeddings [N, D] float32 from pixel values [N, 3, H, W]."""
    return normalize(module.apply({"params": params}, pixel_values, method=CLIPModel.encode_image))


def span_scores(image_emb: jax.Array, text_table: jax.Array, entity_ids: jax.Array) -> jax.Array:
    """[B, T] float32 verifier scores 100 * cos at span ends (entity_ids >= 0), 0 elsewhere.

    image_emb [B, D] and text_table [E, D] are normalised; entity_ids [B, T] index the table."""
    rows = text_table[jnp.clip(entity_ids, 0, text_table.shape[0] - 1)]  # [B, T, D]
    cos = jnp.einsum("btd,bd->bt", rows.astype(jnp.float32), image_emb.astype(jnp.float32))
    return jnp.where(entity_ids >= 0, 100.0 * cos, 0.0)


def word_scores(image_emb: jax.Array, text_table: jax.Array) -> jax.Array:
    """[B, E] scores of every entity against every image (for calibration and plots)."""
    return 100.0 * image_emb.astype(jnp.float32) @ text_table.astype(jnp.float32).T


def sentence_scores(module: CLIPModel, params: Any, tokenizer, image_emb: jax.Array, texts: Sequence[str],
                    max_len: Optional[int] = None) -> jax.Array:
    """[B] 100 * cos(image_b, text_b) of whole responses (the sentence-level ablation).

    Texts longer than the text tower's context are truncated (CLIP's own limit)."""
    emb = text_embeddings(module, params, tokenizer, list(texts), batch_size=max(len(texts), 1), max_len=max_len)
    return 100.0 * jnp.sum(jnp.asarray(emb) * image_emb.astype(jnp.float32), axis=-1)
