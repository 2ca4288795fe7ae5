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


def _vicuna_instructblip_hf(hidden, intermediate, layers, heads):
    from transformers import InstructBlipConfig, LlamaConfig
    text = LlamaConfig(vocab_size=32002, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, max_position_embeddings=2048, rms_norm_eps=1e-6)
    return InstructBlipConfig(qformer_config=dict(vocab_size=30523), text_config=text.to_dict(),
                              num_query_tokens=32, image_token_index=32001)


@pytest.mark.parametrize("name, dims, expected", [
    ("instructblip_vicuna_7b", (4096, 11008, 32, 32), 7_913_218_816),
    ("instructblip_vicuna_13b", (5120, 13824, 40, 40), 14_191_459_072),
])
def test_instructblip_vicuna_parameter_count(name, dims, expected):
    from transformers import InstructBlipForConditionalGeneration
    from fisao_jax.models import blip_configs as B
    hf_cfg = _vicuna_instructblip_hf(*dims)
    with torch.device("meta"):
        hf = InstructBlipForConditionalGeneration(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    ours = abstract_params(B.instructblip_from_hf(hf_cfg))
    assert _count(ours) - _count(ours["value_head"]) == hf_count == expected
    assert B.instructblip_from_hf(hf_cfg) == getattr(B, name)()


def test_blip2_itm_vit_g_parameter_count():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    from fisao_jax.models import blip_configs as B
    hf_cfg = Blip2Config(qformer_config=dict(vocab_size=30523, use_qformer_text_input=True), num_query_tokens=32,
                         image_text_hidden_size=256)
    with torch.device("meta"):
        hf = Blip2ForImageTextRetrieval(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert _count(abstract_params(B.blip2_retrieval_from_hf(hf_cfg))) == hf_count
    assert B.blip2_retrieval_from_hf(hf_cfg) == B.blip2_itm_vit_g()
