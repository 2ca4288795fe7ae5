"""LLaVA-1.5 prompt text (vicuna_v1 template) and left-padded token batches.

Prompt text, as LLaVA-1.5's `conv_vicuna_v1` writes it and as llava-hf's chat template
writes it when given the same system message (the template renders a system message as
its text plus one space, then `USER: <image>\\n{text} ASSISTANT:`):

    A chat between ... questions. USER: <image>\\n{prompt} ASSISTANT:

Token ids follow `transformers.LlavaProcessor`: the text is tokenised with `<image>` as
one special token, and each `<image>` becomes `num_image_tokens` copies of its id (576
for CLIP ViT-L/14 at 336 px with the CLS feature dropped).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"


def strip_image_placeholder(text: str) -> str:
    """Text with every `<image>` removed and outer whitespace stripped (LLaVA's rule)."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def format_prompt(prompt: str, system: str | None = VICUNA_V1_SYSTEM, with_image: bool = True) -> str:
    """One user turn in the LLaVA-1.5 template, ready for generation.

    Like LLaVA's `preprocess_multimodal`, any `<image>` inside `prompt` is moved to the
    front as `<image>\\n`. `system=None` (or '') gives llava-hf's no-system form
    `USER: <image>\\n{prompt} ASSISTANT:`.
    """
    text = strip_image_placeholder(prompt)
    if with_image:
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    head = f"{system} " if system else ""
    return f"{head}{USER_ROLE}: {text} {ASSISTANT_ROLE}:"


def encode_prompts(tokenizer, prompts: Sequence[str], image_token_id: int, num_image_tokens: int,
                   max_len: int | None = None, pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Formatted prompts -> left-padded `(input_ids, attention_mask)`, both int32 `[batch, max_len]`.

    tokenizer: a transformers tokenizer that encodes `<image>` as the single token
      `image_token_id` (llava-hf's does; add it as a special token otherwise).
    Each `<image>` expands to `num_image_tokens` ids. BOS is added as the tokenizer does.
    max_len: pad to this length (static shapes for jit); None pads to the longest prompt.
      A longer prompt raises (naming its index and length) rather than being truncated.
    pad_id: id written in padded slots (mask 0); default the tokenizer's pad id, else 0.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    # One placeholder token per image is tokenised and expanded afterwards: the text around
    # a run of identical special tokens tokenises the same as around a single one.
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    rows = []
    for i, (text, ids) in enumerate(zip(prompts, encoded)):
        ids = np.asarray(ids, dtype=np.int64)
        found = int((ids == image_token_id).sum())
        expected = text.count(IMAGE_PLACEHOLDER)
        if found != expected:
            raise ValueError(
                f"prompt {i}: {expected} '{IMAGE_PLACEHOLDER}' placeholder(s) but {found} token(s) with id "
                f"{image_token_id}; the tokenizer must encode '{IMAGE_PLACEHOLDER}' as that single token")
        repeats = np.where(ids == image_token_id, num_image_tokens, 1)
        rows.append(np.repeat(ids, repeats))
    longest = max(len(r) for r in rows)
    length = longest if max_len is None else int(max_len)
    too_long = [(i, len(r)) for i, r in enumerate(rows) if len(r) > length]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"prompt {i} is {n} tokens (with {num_image_tokens} per image), longer than max_len={length}"
                         f" ({len(too_long)} prompt(s) too long)")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = r
        attention_mask[i, length - len(r):] = 1
    return input_ids, attention_mask
