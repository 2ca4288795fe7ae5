"""LLaVA-1.5: CLIP vision tower -> 2-layer GELU projector -> LLaMA decoder, plus a value head.

`LlavaModel.apply({'params': p}, input_ids, pixel_values, attention_mask)` returns logits
[B, T, V] like transformers' `LlavaForConditionalGeneration`. The policy interface
(`image_features`, `forward`) is `fisao_jax.models.vlm.VisionLanguageModel`'s.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fisao_jax.models.clip import CLIPVisionTransformer, activation
from fisao_jax.models.vlm import VisionLanguageModel


class MultiModalProjector(nn.Module):
    out_features: int
    act: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        x = activation(self.act)(nn.Dense(self.out_features, name="linear_1", **kw)(x))
        return nn.Dense(self.out_features, name="linear_2", **kw)(x)


def feature_indices(layer: Union[int, Sequence[int]], num_layers: int) -> tuple[int, ...]:
    """Indices into the vision tower's hidden states (0 = embeddings) of `vision_feature_layer`
    (negative counts from the end, as in transformers); ValueError when out of range."""
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    idx = tuple(l if l >= 0 else num_layers + 1 + l for l in layers)
    for l, i in zip(layers, idx):
        if not 0 <= i <= num_layers:
            raise ValueError(f"vision_feature_layer {l} out of range for {num_layers} vision layers")
    return idx


class LlavaModel(VisionLanguageModel):
    """LLaVA: `image_features(pixel_values [N_img, 3, H, W])` -> [N_img, num_image_tokens, D_text]."""

    image_input_keys = ("pixel_values",)
    vision_param_key = "vision_tower"

    def setup_vision(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = CLIPVisionTransformer(c.vision, **kw)
        self.multi_modal_projector = MultiModalProjector(c.text.hidden_size, c.projector_hidden_act,
                                                         c.projector_bias, **kw)

    def vision_hidden_states(self, pixel_values: jax.Array) -> tuple[jax.Array, ...]:
        """The vision tower's hidden states (0 = embeddings) up to the deepest feature layer."""
        c = self.cfg
        idx = feature_indices(c.vision_feature_layer, c.vision.num_hidden_layers)
        run = c.vision.num_hidden_layers if self.is_initializing() else max(idx)
        hidden, _ = self.vision_tower(pixel_values, num_layers=run)
        return hidden

    def select_features(self, hidden: tuple) -> jax.Array:
        """The feature layers of the tower's hidden states, concatenated, CLS dropped under the
        'default' strategy: [N_img, num_image_tokens, D_vision x layers] (before the projector)."""
        c = self.cfg
        idx = feature_indices(c.vision_feature_layer, c.vision.num_hidden_layers)
        feats = jnp.concatenate([hidden[i] for i in idx], axis=-1)
        return feats[:, 1:] if c.vision_feature_select_strategy == "default" else feats

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[N_img, 3, H, W] -> projected features [N_img, num_image_tokens, D_text]."""
        return self.multi_modal_projector(self.select_features(self.vision_hidden_states(pixel_values)))

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                 use_lora: bool = True, deterministic: bool = True):
        """Logits [B, T, V] (float32), as transformers' LlavaForConditionalGeneration."""
        feats = None if pixel_values is None else self.image_features(pixel_values)
        return self.forward(input_ids, feats, attention_mask, position_ids,
                            use_lora=use_lora, deterministic=deterministic)["logits"]
