"""Entity spans in token ids: which positions end a whole-word mention of an entity.

SPEC step 4. `build_span_table` runs once on the host; `find_entity_spans` is jittable and
vectorized over `[batch, seq]`. The matching rule, shared with `reference_entity_spans`:

- Token text: the SentencePiece piece with '▁' and whitespace read as ' ' and ASCII
  letters lower-cased; a byte-fallback token <0xNN> is that ASCII character, or a non-word
  placeholder for bytes >= 0x80. Special tokens (<s>, </s>, <unk>, <image>, <pad>, ...),
  ids outside the vocabulary and positions where `mask` is 0 separate words.
- Word characters are ASCII letters and digits; everything else ends a word.
- Tokens [a, b] mention entity e when the text of token a without its leading whitespace,
  followed by the texts of a+1..b, equals e (so the mention starts and ends on token
  boundaries); the character before it is not a word character (or a starts the sequence
  or follows a separator) and neither is the one after it. Matching is case-insensitive
  and independent of how the text was split into tokens.
- Longest match wins: a match whose token span lies inside another match is dropped
  ("hot dog" over "dog", "baseball bat" over "baseball" and "bat"). Partly overlapping
  matches are both kept.
- Mentions longer than `max_span_len` tokens are not found.

Implementation: every token's text gets two 32-bit polynomial hashes (and BASE**len) on the
host; on device the hash of a token window is composed from them (hash(x + y) =
hash(x) * BASE**len(y) + hash(y) mod 2**32) for every window length up to max_span_len, and
looked up in the sorted hashes of the entity surface forms, together with the length.
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fisao_jax.rewards.entities import EntityVocab

_MASK32 = 0xFFFFFFFF
_NUM_HASHES = 2
_BYTE_PIECE_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Code of a byte >= 0x80 from byte fallback: past the last Unicode code point, never a word char.
_HIGH_BYTE_BASE = 0x110000
_WORD_CODES = frozenset(map(ord, "abcdefghijklmnopqrstuvwxyz0123456789"))
_SPACE = ord(" ")


@flax.struct.dataclass
class SpanTable:
    """Per-token and per-entity hash arrays for `find_entity_spans` (a pytree).

    V = tokenizer vocabulary size (with added tokens), K = number of entity surface forms.
    """

    token_hash: jax.Array  # [V, 2] uint32: hashes of the token's normalised text
    token_pow: jax.Array  # [V, 2] uint32: BASE ** len(text)
    token_len: jax.Array  # [V] int32: characters in the text
    strip_hash: jax.Array  # [V, 2] uint32: hashes of the text without leading whitespace
    strip_len: jax.Array  # [V] int32
    is_text: jax.Array  # [V] bool: False for special tokens (they separate words)
    starts_word: jax.Array  # [V] bool: text without leading whitespace starts with a word char
    leading_space: jax.Array  # [V] bool: text starts with whitespace (a word-start marker)
    first_is_word: jax.Array  # [V] bool: first character is a word char
    last_is_word: jax.Array  # [V] bool: last character is a word char
    entity_hash: jax.Array  # [K, 2] uint32, sorted by column 0 (unique there)
    entity_len: jax.Array  # [K] int32
    entity_id: jax.Array  # [K] int32: index into EntityVocab.surface_forms
    # Most tokens any surface form takes in its usual spellings (lower, Capitalised,
    # Title, UPPER case); the default max_span_len.
    max_entity_tokens: int = flax.struct.field(pytree_node=False, default=8)


class EntitySpans(NamedTuple):
    """entity_id: [B, T] int32 entity at a mention's last token, -1 elsewhere.
    start: [B, T] int32 index of that mention's first token, -1 elsewhere."""

    entity_id: jax.Array
    start: jax.Array


# ----------------------------------------------------------------------------- host side

def token_codes(tokenizer) -> list[list[int] | None]:
    """Normalised character codes of every token id (None for special tokens).

    Raises ValueError for tokenizers without SentencePiece '▁' word-start markers (e.g.
    GPT-2 style byte-level BPE, whose 'Ġ' pieces this module does not read).
    """
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
               if getattr(tok, "special", True)}
    special |= set(tokenizer.all_special_ids)
    if not any(p and "▁" in p for p in pieces) and any(p and "Ġ" in p for p in pieces):
        raise ValueError(f"{type(tokenizer).__name__}: byte-level BPE tokenizers ('Ġ' word "
                         f"markers) are not supported; expected SentencePiece '▁' pieces")
    out: list[list[int] | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
            continue
        byte = _BYTE_PIECE_RE.fullmatch(piece)
        if byte:
            value = int(byte.group(1), 16)
            out.append([_normalise_char(chr(value)) if value < 0x80 else _HIGH_BYTE_BASE + value])
        else:
            out.append([_normalise_char(c) for c in piece])
    return out


def build_span_table(tokenizer, vocab: EntityVocab, max_entity_tokens: int | None = None) -> SpanTable:
    """Hash tables for `find_entity_spans` from a SentencePiece-style tokenizer.

    Args:
      tokenizer: a transformers tokenizer with '▁' pieces (LLaMA / our `train_tokenizer`).
      vocab: the entity vocabulary; entity ids index `vocab.surface_forms`.
      max_entity_tokens: stored default for `max_span_len`; None measures it by tokenizing
        every surface form in lower, Capitalised, Title and UPPER case.
    """
    if len(vocab) == 0:
        raise ValueError("build_span_table: the entity vocabulary is empty")
    codes = token_codes(tokenizer)
    forms = [[ord(c) for c in form] for form in vocab.surface_forms]
    for salt in range(64):
        bases, values = _hash_params(salt)
        entity_hash = np.array([_hash(f, bases, values) for f in forms], np.uint32)
        if len(np.unique(entity_hash[:, 0])) == len(forms):
            break
    else:  # pragma: no cover - 64 colliding salts would mean a broken hash
        raise RuntimeError("build_span_table: no hash salt without collisions")

    v = len(codes)
    token_hash = np.zeros((v, _NUM_HASHES), np.uint32)
    token_pow = np.ones((v, _NUM_HASHES), np.uint32)
    strip_hash = np.zeros((v, _NUM_HASHES), np.uint32)
    token_len = np.zeros(v, np.int32)
    strip_len = np.zeros(v, np.int32)
    flags = {k: np.zeros(v, bool) for k in
             ("is_text", "starts_word", "leading_space", "first_is_word", "last_is_word")}
    for i, c in enumerate(codes):
        if not c:
            continue
        stripped = c[len(c) - len(_lstrip_spaces(c)):]
        token_hash[i] = _hash(c, bases, values)
        token_pow[i] = [pow(b, len(c), 1 << 32) for b in bases]
        strip_hash[i] = _hash(stripped, bases, values)
        token_len[i], strip_len[i] = len(c), len(stripped)
        flags["is_text"][i] = True
        flags["starts_word"][i] = bool(stripped) and stripped[0] in _WORD_CODES
        flags["leading_space"][i] = c[0] == _SPACE
        flags["first_is_word"][i] = c[0] in _WORD_CODES
        flags["last_is_word"][i] = c[-1] in _WORD_CODES

    order = np.argsort(entity_hash[:, 0], kind="stable")
    if max_entity_tokens is None:
        max_entity_tokens = measure_max_entity_tokens(tokenizer, vocab.surface_forms)
    return SpanTable(
        token_hash=jnp.asarray(token_hash), token_pow=jnp.asarray(token_pow),
        token_len=jnp.asarray(token_len), strip_hash=jnp.asarray(strip_hash),
        strip_len=jnp.asarray(strip_len),
        **{k: jnp.asarray(a) for k, a in flags.items()},
        entity_hash=jnp.asarray(entity_hash[order]),
        entity_len=jnp.asarray(np.array([len(forms[i]) for i in order], np.int32)),
        entity_id=jnp.asarray(order.astype(np.int32)),
        max_entity_tokens=int(max_entity_tokens))


def measure_max_entity_tokens(tokenizer, surface_forms: Sequence[str]) -> int:
    """Most tokens a surface form takes after a space, in lower/Capital/Title/UPPER case."""
    variants = [v for f in surface_forms for v in {f, f.capitalize(), f.title(), f.upper()}]
    encoded = tokenizer(variants, add_special_tokens=False)["input_ids"]
    bare_space = {i for i, c in enumerate(token_codes(tokenizer)) if c and set(c) == {_SPACE}}
    return max(len(ids) - (bool(ids) and ids[0] in bare_space) for ids in encoded)


def _normalise_char(ch: str) -> int:
    if ch == "▁" or ch.isspace():
        return _SPACE
    if "A" <= ch <= "Z":
        return ord(ch) + 32
    return ord(ch)


def _lstrip_spaces(c: list[int]) -> list[int]:
    i = 0
    while i < len(c) and c[i] == _SPACE:
        i += 1
    return c[i:]


def _mix32(x: int) -> int:
    """A 32-bit integer finaliser (murmur3's fmix32)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _hash_params(salt: int):
    bases = [_mix32(0x9E3779B9 * (2 * salt + k + 1)) | 1 for k in range(_NUM_HASHES)]
    values = [lambda code, k=k: _mix32(code * 0x27D4EB2F + (salt * _NUM_HASHES + k + 1) * 0x165667B1)
              for k in range(_NUM_HASHES)]
    return bases, values


def _hash(codes: Sequence[int], bases, values) -> list[int]:
    out = []
    for base, value in zip(bases, values):
        h = 0
        for c in codes:
            h = (h * base + value(c)) & _MASK32
        out.append(h)
    return out


# ----------------------------------------------------------------------------- device side

def _shift(x: jax.Array, k: int, fill) -> jax.Array:
    """x[:, t - k] along axis 1 (k > 0: later positions see earlier ones), padded with fill."""
    if k == 0:
        return x
    t = x.shape[1]
    pad = jnp.full((x.shape[0], min(abs(k), t)) + x.shape[2:], fill, x.dtype)
    if abs(k) >= t:
        return pad
    if k > 0:
        return jnp.concatenate([pad, x[:, :-k]], axis=1)
    return jnp.concatenate([x[:, -k:], pad], axis=1)


def _lookup(table: SpanTable, h: jax.Array, length: jax.Array) -> jax.Array:
    """Entity id for window hashes h [..., 2] and lengths [...]; -1 where none matches."""
    keys = table.entity_hash[:, 0]
    idx = jnp.minimum(jnp.searchsorted(keys, h[..., 0]), keys.shape[0] - 1)
    hit = ((keys[idx] == h[..., 0]) & (table.entity_hash[idx, 1] == h[..., 1])
           & (table.entity_len[idx] == length))
    return jnp.where(hit, table.entity_id[idx], -1)


@functools.partial(jax.jit, static_argnames=("max_span_len",))
def find_entity_span_bounds(token_ids: jax.Array, mask: jax.Array, table: SpanTable,
                            max_span_len: int | None = None) -> EntitySpans:
    """Entity mentions in `token_ids` [B, T] where `mask` [B, T] is nonzero.

    Returns EntitySpans(entity_id, start), both [B, T] int32: at a mention's last token its
    entity id and first-token index, -1 elsewhere. max_span_len: longest mention in tokens
    (static; default `table.max_entity_tokens`).
    """
    max_len = table.max_entity_tokens if max_span_len is None else int(max_span_len)
    if max_len < 1:
        raise ValueError(f"max_span_len must be >= 1, got {max_len}")
    batch, seq = token_ids.shape
    vocab_size = table.token_len.shape[0]
    valid = (mask != 0) & (token_ids >= 0) & (token_ids < vocab_size)
    ids = jnp.where(valid, token_ids, 0)
    valid = valid & table.is_text[ids]

    h, p, n = table.token_hash[ids], table.token_pow[ids], table.token_len[ids]
    sh, sn = table.strip_hash[ids], table.strip_len[ids]
    prev_is_word = _shift(valid & table.last_is_word[ids], 1, False)
    left_ok = valid & table.starts_word[ids] & (table.leading_space[ids] | ~prev_is_word)
    right_ok = valid & ~_shift(valid & table.first_is_word[ids], -1, False)

    # Windows [t - L + 1, t] for L = 1..max_len; acc_* describe tokens t - L + 2 .. t.
    acc_h = jnp.zeros((batch, seq, _NUM_HASHES), jnp.uint32)
    acc_p = jnp.ones((batch, seq, _NUM_HASHES), jnp.uint32)
    acc_n = jnp.zeros((batch, seq), jnp.int32)
    all_valid = jnp.ones((batch, seq), bool)
    best_id = jnp.full((batch, seq), -1, jnp.int32)
    best_len = jnp.zeros((batch, seq), jnp.int32)
    for length in range(1, min(max_len, seq) + 1):
        k = length - 1
        all_valid = all_valid & _shift(valid, k, False)
        window_h = _shift(sh, k, 0) * acc_p + acc_h
        window_n = _shift(sn, k, 0) + acc_n
        eid = _lookup(table, window_h, window_n)
        hit = _shift(left_ok, k, False) & all_valid & right_ok & (eid >= 0)
        best_id = jnp.where(hit, eid, best_id)
        best_len = jnp.where(hit, length, best_len)
        acc_h = _shift(h, k, 0) * acc_p + acc_h
        acc_p = _shift(p, k, 1) * acc_p
        acc_n = _shift(n, k, 0) + acc_n

    # Drop a match contained in one that ends later and starts no later.
    found = best_id >= 0
    start = jnp.where(found, jnp.arange(seq)[None, :] - best_len + 1, seq)
    later_min_start = _shift(jax.lax.cummin(start, axis=1, reverse=True), -1, seq)
    keep = found & (later_min_start > start)
    return EntitySpans(jnp.where(keep, best_id, -1), jnp.where(keep, start, -1))


def find_entity_spans(token_ids: jax.Array, mask: jax.Array, table: SpanTable,
                      max_span_len: int | None = None) -> jax.Array:
    """[B, T] int32: entity id at the last token of each mention, -1 elsewhere (jitted)."""
    return find_entity_span_bounds(token_ids, mask, table, max_span_len=max_span_len).entity_id


# ----------------------------------------------------------------------------- reference

def reference_entity_spans(token_ids, mask, tokenizer, vocab: EntityVocab,
                           max_span_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow per-sequence implementation of the same rule: decode, find words, look up.

    For tests. Returns (entity_id, start) as [B, T] int32 numpy arrays.
    """
    token_ids = np.asarray(token_ids)
    mask = np.asarray(mask)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if getattr(tok, "special", True)}
    index = {form: i for i, form in enumerate(vocab.surface_forms)}
    longest = max(len(f) for f in vocab.surface_forms)
    out_id = np.full(token_ids.shape, -1, np.int32)
    out_start = np.full(token_ids.shape, -1, np.int32)

    for row in range(token_ids.shape[0]):
        text, owner, token_begin, token_end = [], [], {}, {}
        for t, tid in enumerate(token_ids[row].tolist()):
            if not mask[row, t] or not 0 <= tid < len(pieces) or tid in special:
                piece_text = "\0"  # a separator: not a word character, matches nothing
            else:
                piece_text = _reference_piece_text(pieces[tid])
            token_begin[t] = len(text)
            text.extend(piece_text)
            owner.extend([t] * len(piece_text))
            token_end[t] = len(text)
        text = "".join(text)
        words = [(m.start(), m.end()) for m in re.finditer(r"[a-z0-9]+", text)]
        matches = []
        for wi, (i, _) in enumerate(words):
            for _, j in words[wi:]:
                if j - i > longest:
                    break
                form = text[i:j]
                if form not in index:
                    continue
                a, b = owner[i], owner[j - 1]
                aligned = text[token_begin[a]:i].strip(" ") == "" and j == token_end[b]
                if aligned and b - a + 1 <= max_span_len:
                    matches.append((a, b, index[form]))
        for a, b, eid in matches:
            inside_another = any(a2 <= a and b <= b2 and (a2, b2) != (a, b) for a2, b2, _ in matches)
            if not inside_another:
                out_id[row, b], out_start[row, b] = eid, a
    return out_id, out_start


def _reference_piece_text(piece: str) -> str:
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if byte:
        value = int(byte.group(1), 16)
        piece = chr(value) if value < 0x80 else "\ufffd"
    text = "".join(" " if (c == "▁" or c.isspace()) else c for c in piece)
    return "".join(c.lower() if c.isascii() else c for c in text)
