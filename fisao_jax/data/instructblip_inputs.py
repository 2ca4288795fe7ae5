"""InstructBLIP inputs as transformers' `InstructBlipProcessor` builds them.

Images (`BlipImageProcessor`): to RGB, resize to exactly (image_size, image_size) with PIL
bicubic (aspect ratio not kept), x / 255, normalise with the OpenAI CLIP mean / std; no pad
to square, no crop. -> float32 [N, 3, image_size, image_size].

Prompts: InstructBLIP (Vicuna) has no chat template; the instruction is the raw prompt.
  input_ids          = `num_query_tokens` image tokens, then the LLaMA tokenizer's encoding
                       of the instruction (BOS as the tokenizer adds it);
  qformer_input_ids  = the Q-Former's BERT tokenizer's encoding of the same instruction
                       ([CLS] ... [SEP]), right-padded as BERT pads, positions 0..L-1.

transformers pads the instruction (on the tokenizer's side, left for LLaMA) and only then
prepends the image tokens, so its padding sits between image tokens and text. The default
here, `layout='left'`, puts all padding first, as the rest of this package expects (a prompt
is the suffix of its row); `layout='processor'` reproduces transformers' arrays exactly. With
position ids cumsum(mask) - 1 (ours, and transformers' `generate`) both give the same logits.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fisao_jax.data.image import ImageInput, preprocess_batch
from fisao_jax.data.image_config import ImageConfig

LAYOUTS = ("left", "processor")


def instructblip_image_config(image_size: int = 224) -> ImageConfig:
    """`BlipImageProcessor` of the InstructBLIP / BLIP-2 checkpoints (224 px)."""
    return ImageConfig(size=(image_size, image_size), crop=(image_size, image_size), pad_to_square=False,
                       do_center_crop=False)


def preprocess_images(images: Sequence[ImageInput], image_size: int = 224, num_workers: int = 0) -> np.ndarray:
    """Images -> float32 pixel_values [N, 3, image_size, image_size]."""
    return preprocess_batch(images, instructblip_image_config(image_size), num_workers=num_workers)


def _pad_rows(rows: list[np.ndarray], length: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, span] = r
        mask[i, span] = 1
    return ids, mask


def _check_length(rows: list, length: int, what: str) -> None:
    too_long = [(i, len(r)) for i, r in enumerate(rows) if len(r) > length]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"prompt {i} is {n} {what} tokens, longer than the limit {length} "
                         f"({len(too_long)} prompt(s) too long)")


def encode_instructblip_prompts(tokenizer, qformer_tokenizer, prompts: Sequence[str], image_token_id: int,
                                num_query_tokens: int, max_len: int | None = None,
                                qformer_max_len: int | None = None, pad_id: int | None = None,
                                layout: str = "left") -> dict[str, np.ndarray]:
    """Instructions -> {'input_ids', 'attention_mask' [B, T]; 'qformer_input_ids',
    'qformer_attention_mask' [B, L]}, all int32.

    tokenizer: the language model's (LLaMA) tokenizer; qformer_tokenizer: the Q-Former's BERT
      tokenizer. One image per prompt.
    max_len / qformer_max_len: pad to these lengths (static shapes for jit); None pads to the
      longest. T counts the image tokens. A longer prompt raises (naming its index) rather
      than being truncated.
    pad_id: LM id written in padded slots (mask 0); default the tokenizer's pad id, else 0.
      The Q-Former rows are padded with its tokenizer's pad id (BERT: 0).
    layout: 'left' (all padding first) or 'processor' (transformers': image tokens, then the
      instruction padded on the tokenizer's side).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if num_query_tokens < 1:
        raise ValueError(f"num_query_tokens must be >= 1, got {num_query_tokens}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_instructblip_prompts needs at least one prompt")
    text = [np.asarray(r, dtype=np.int64) for r in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    for i, r in enumerate(text):
        if (r == image_token_id).any():
            raise ValueError(f"prompt {i} encodes an image token (id {image_token_id}) inside the instruction; "
                             f"the image tokens are added in front of it")
    image = np.full(num_query_tokens, image_token_id, dtype=np.int64)
    length = max(len(r) for r in text) + num_query_tokens if max_len is None else int(max_len)
    _check_length([np.concatenate([image, r]) for r in text], length, "language-model")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
    if layout == "left":
        input_ids, attention_mask = _pad_rows([np.concatenate([image, r]) for r in text], length, pad_id, left=True)
    else:
        left = getattr(tokenizer, "padding_side", "left") == "left"
        ids, mask = _pad_rows(text, length - num_query_tokens, pad_id, left=left)
        input_ids = np.concatenate([np.broadcast_to(image.astype(np.int32), (len(text), num_query_tokens)), ids], 1)
        attention_mask = np.concatenate([np.ones((len(text), num_query_tokens), np.int32), mask], 1)

    qtext = [np.asarray(r, dtype=np.int64) for r in qformer_tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    qlength = max(len(r) for r in qtext) if qformer_max_len is None else int(qformer_max_len)
    _check_length(qtext, qlength, "Q-Former")
    qpad = getattr(qformer_tokenizer, "pad_token_id", None) or 0
    qids, qmask = _pad_rows(qtext, qlength, qpad, left=False)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "qformer_input_ids": qids, "qformer_attention_mask": qmask}
