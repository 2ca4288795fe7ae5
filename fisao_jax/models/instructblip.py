"""InstructBLIP (Vicuna): ViT-g -> Q-Former (queries + instruction, cross-attending to the
image) -> linear `language_projection` -> LLaMA decoder, plus a value head.

`InstructBlipModel.apply({'params': p}, input_ids, pixel_values, attention_mask,
qformer_input_ids, qformer_attention_mask)` returns logits [B, T, V] like transformers'
`InstructBlipForConditionalGeneration`: `input_ids` hold `num_query_tokens` image tokens
per image and the projected query outputs replace them in order (transformers'
`special_image_mask` + `masked_scatter`, i.e. `VisionLanguageModel.embed_inputs`). The
policy interface (`image_features`, `forward`) is `VisionLanguageModel`'s; the vision
model and Q-Former are frozen in training (LoRA is on the language model only).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fisao_jax.models.blip2 import BlipVisionTransformer, InstructBlipQFormer
from fisao_jax.models.vlm import VisionLanguageModel


class InstructBlipModel(VisionLanguageModel):
    """`image_features(pixel_values, qformer_input_ids, qformer_attention_mask)` ->
    [N_img, num_query_tokens, D_text]; one instruction row per image."""

    image_input_keys = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")

    def setup_vision(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = BlipVisionTransformer(c.vision, **kw)
        self.query_tokens = self.param("query_tokens", nn.initializers.normal(0.02),
                                       (1, c.num_query_tokens, c.qformer.hidden_size), self.param_dtype)
        self.qformer = InstructBlipQFormer(c.qformer, **kw)
        self.language_projection = nn.Dense(c.text.hidden_size, **kw)

    def image_features(self, pixel_values: jax.Array, qformer_input_ids: Optional[jax.Array] = None,
                       qformer_attention_mask: Optional[jax.Array] = None) -> jax.Array:
        """pixel_values [N_img,3,H,W], the instruction in the Q-Former's vocabulary
        qformer_input_ids / qformer_attention_mask [N_img, L] (right-padded; None = queries
        only) -> projected query outputs [N_img, num_query_tokens, D_text]."""
        image = self.vision_model(pixel_values)
        n = image.shape[0]
        if qformer_input_ids is not None and qformer_input_ids.shape[0] != n:
            raise ValueError(f"qformer_input_ids has {qformer_input_ids.shape[0]} rows for {n} images "
                             f"(one instruction row per image)")
        q = self.cfg.num_query_tokens
        queries = jnp.broadcast_to(self.query_tokens.astype(self.dtype), (n, q, self.query_tokens.shape[-1]))
        out = self.qformer(queries, qformer_input_ids, qformer_attention_mask, image)
        return self.language_projection(out[:, :q])

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, qformer_input_ids=None,
                 qformer_attention_mask=None, position_ids=None, use_lora: bool = True,
                 deterministic: bool = True):
        """Logits [B, T, V] (float32), as transformers' InstructBlipForConditionalGeneration
        given the same position ids (default: cumsum(attention_mask) - 1, as its `generate`)."""
        feats = None if pixel_values is None else self.image_features(pixel_values, qformer_input_ids,
                                                                       qformer_attention_mask)
        return self.forward(input_ids, feats, attention_mask, position_ids,
                            use_lora=use_lora, deterministic=deterministic)["logits"]
