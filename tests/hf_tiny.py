"""Tiny random transformers models saved with `save_pretrained`, for parity tests."""
from __future__ import annotations

import pathlib

import numpy as np

IMAGE_TOKEN = 99
VOCAB = 100


def llava_config(gqa: bool = True, feature_layer=-2, strategy: str = "default", layers: int = 2,
                 vision_layers: int = 3):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                          num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2 if gqa else 4, vocab_size=VOCAB, max_position_embeddings=128,
                     rope_theta=10000.0)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                       vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)


def save_llava(folder: pathlib.Path, seed: int = 0, **kw):
    """Build, perturb (so norms/biases are not trivially 1/0) and save a tiny LLaVA; returns the torch model."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = llava_config(**kw)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight", ".bias")) or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def save_clip(folder: pathlib.Path, seed: int = 0, eos_token_id: int = 2):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14),
        projection_dim=24)
    cfg._attn_implementation = "eager"
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def llava_inputs(num_image_tokens: int, images_per_row=(1, 1), pads=(2, 0), text_len: int = 5, seed: int = 0):
    """Left-padded ids [B,T], mask [B,T], pixels [N_img,3,28,28], position ids [B,T]."""
    rng = np.random.RandomState(seed)
    rows = []
    for n_img, pad in zip(images_per_row, pads):
        toks = [1]
        for _ in range(n_img):
            toks += [IMAGE_TOKEN] * num_image_tokens + list(rng.randint(3, IMAGE_TOKEN, size=2))
        toks += list(rng.randint(3, IMAGE_TOKEN, size=text_len))
        rows.append((pad, toks))
    t = max(pad + len(toks) for pad, toks in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, (pad, toks) in enumerate(rows):
        start = t - len(toks)
        ids[i, start:] = toks
        mask[i, start:] = 1
    pixels = rng.randn(sum(images_per_row), 3, 28, 28).astype(np.float32)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, pixels, pos
