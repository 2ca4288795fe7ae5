"""Abstract parameter counts at the real sizes equal transformers' counts for the same configs."""
import math

import jax
import pytest

torch = pytest.importorskip("torch")

from fisao_jax.models import configs as C  # noqa: E402
from fisao_jax.models.hf_io import abstract_params  # noqa: E402


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_llava_1_5_7b_parameter_count():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    hf_cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, image_size=336, intermediate_size=4096,
                                       num_attention_heads=16, num_hidden_layers=24, patch_size=14,
                                       projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        image_token_index=32000, pad_token_id=32001)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    ours = abstract_params(C.llava_from_hf(hf_cfg))
    ours_count = _count(ours) - _count(ours["value_head"])
    assert ours_count == hf_count == 7_063_427_072
    assert C.llava_from_hf(hf_cfg) == C.llava_1_5_7b()


def test_clip_vit_large_patch14_336_parameter_count():
    from transformers import CLIPConfig, CLIPModel
    hf_cfg = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768, eos_token_id=2),
        vision_config=dict(hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16,
                           num_hidden_layers=24, patch_size=14, projection_dim=768),
        projection_dim=768)
    with torch.device("meta"):
        hf = CLIPModel(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert _count(abstract_params(C.clip_from_hf(hf_cfg))) == hf_count
    assert C.clip_from_hf(hf_cfg) == C.clip_vit_large_patch14_336()
