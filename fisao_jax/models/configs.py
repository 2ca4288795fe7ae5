"""Model configurations (plain dataclasses) and their construction from Hugging Face configs.

Our configs hold only what the Flax modules need. `from_hf_*` accept a `transformers`
config object or a `config.json` dict (v4 `rope_theta` or v5 `rope_parameters` layouts).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407
    # Pool at the highest token id (transformers' rule for legacy configs with eos_token_id == 2)
    # instead of at the first EOS. None = transformers' rule.
    argmax_pooling: Optional[bool] = None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: CLIPVisionConfig = CLIPVisionConfig()
    text: CLIPTextConfig = CLIPTextConfig()
    projection_dim: int = 768


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on every linear layer of the language model. rank 0 = no LoRA parameters."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: Optional[int] = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # 'linear' RoPE scaling; 1.0 = none
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: Optional[int] = None

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: CLIPVisionConfig = CLIPVisionConfig()
    text: LlamaConfig = LlamaConfig()
    lora: LoRAConfig = LoRAConfig()
    image_token_id: int = 32000
    vision_feature_layer: Union[int, Sequence[int]] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image in the input ids (CLS dropped under 'default')."""
        n = self.vision.num_patches
        return n if self.vision_feature_select_strategy == "default" else n + 1


# ----------------------------------------------------------------------------- HF parsing

def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _subconfig(cfg: Any, name: str) -> Any:
    sub = _get(cfg, name)
    if sub is None:
        raise ValueError(f"config has no '{name}' section")
    return sub


def clip_vision_from_hf(cfg: Any) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=_get(cfg, "hidden_size", 768),
        intermediate_size=_get(cfg, "intermediate_size", 3072),
        num_hidden_layers=_get(cfg, "num_hidden_layers", 12),
        num_attention_heads=_get(cfg, "num_attention_heads", 12),
        image_size=_get(cfg, "image_size", 224),
        patch_size=_get(cfg, "patch_size", 32),
        num_channels=_get(cfg, "num_channels", 3),
        layer_norm_eps=_get(cfg, "layer_norm_eps", 1e-5),
        hidden_act=_get(cfg, "hidden_act", "quick_gelu"),
    )


def clip_text_from_hf(cfg: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=_get(cfg, "vocab_size", 49408),
        hidden_size=_get(cfg, "hidden_size", 512),
        intermediate_size=_get(cfg, "intermediate_size", 2048),
        num_hidden_layers=_get(cfg, "num_hidden_layers", 12),
        num_attention_heads=_get(cfg, "num_attention_heads", 8),
        max_position_embeddings=_get(cfg, "max_position_embeddings", 77),
        layer_norm_eps=_get(cfg, "layer_norm_eps", 1e-5),
        hidden_act=_get(cfg, "hidden_act", "quick_gelu"),
        eos_token_id=_get(cfg, "eos_token_id", 2),
    )


def clip_from_hf(cfg: Any) -> CLIPConfig:
    return CLIPConfig(
        vision=clip_vision_from_hf(_subconfig(cfg, "vision_config")),
        text=clip_text_from_hf(_subconfig(cfg, "text_config")),
        projection_dim=_get(cfg, "projection_dim", 512),
    )


def _rope(cfg: Any) -> tuple[float, float]:
    params = _get(cfg, "rope_parameters") or {}
    scaling = _get(cfg, "rope_scaling") or {}
    theta = params.get("rope_theta", _get(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind == "default":
        return float(theta), 1.0
    if kind == "linear":
        return float(theta), float(params.get("factor", scaling.get("factor", 1.0)))
    raise ValueError(f"unsupported RoPE type {kind!r} (supported: 'default', 'linear')")


def llama_from_hf(cfg: Any) -> LlamaConfig:
    theta, factor = _rope(cfg)
    heads = _get(cfg, "num_attention_heads", 32)
    act = _get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported LLaMA hidden_act {act!r} (expected 'silu')")
    eos = _get(cfg, "eos_token_id", 2)
    return LlamaConfig(
        vocab_size=_get(cfg, "vocab_size", 32000),
        hidden_size=_get(cfg, "hidden_size", 4096),
        intermediate_size=_get(cfg, "intermediate_size", 11008),
        num_hidden_layers=_get(cfg, "num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=_get(cfg, "num_key_value_heads", None) or heads,
        head_dim=_get(cfg, "head_dim", None),
        max_position_embeddings=_get(cfg, "max_position_embeddings", 2048),
        rms_norm_eps=_get(cfg, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling_factor=factor,
        attention_bias=bool(_get(cfg, "attention_bias", False)),
        mlp_bias=bool(_get(cfg, "mlp_bias", False)),
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        bos_token_id=_get(cfg, "bos_token_id", 1),
        eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=_get(cfg, "pad_token_id", None),
    )


def llava_from_hf(cfg: Any, lora: LoRAConfig = LoRAConfig()) -> LlavaConfig:
    text = _subconfig(cfg, "text_config")
    if _get(text, "model_type", "llama") not in ("llama",):
        raise ValueError(f"unsupported LLaVA text model {_get(text, 'model_type')!r} (expected 'llama')")
    tie = _get(cfg, "tie_word_embeddings", None)
    text_cfg = llama_from_hf(text)
    if tie is not None and _get(text, "tie_word_embeddings", None) is None:
        text_cfg = dataclasses.replace(text_cfg, tie_word_embeddings=bool(tie))
    if text_cfg.pad_token_id is None and _get(cfg, "pad_token_id", None) is not None:
        text_cfg = dataclasses.replace(text_cfg, pad_token_id=_get(cfg, "pad_token_id"))
    layer = _get(cfg, "vision_feature_layer", -2)
    strategy = _get(cfg, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    return LlavaConfig(
        vision=clip_vision_from_hf(_subconfig(cfg, "vision_config")),
        text=text_cfg,
        lora=lora,
        image_token_id=_get(cfg, "image_token_index", _get(cfg, "image_token_id", 32000)),
        vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else int(layer),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=_get(cfg, "projector_hidden_act", "gelu"),
        projector_bias=bool(_get(cfg, "multimodal_projector_bias", True)),
    )


# ----------------------------------------------------------------------------- (de)serialisation

CLASSES = {c.__name__: c for c in (CLIPVisionConfig, CLIPTextConfig, CLIPConfig, LoRAConfig, LlamaConfig, LlavaConfig)}
"""The config classes of this module by name (`fisao_jax.models.config_io` serialises them)."""


# ----------------------------------------------------------------------------- real sizes

def clip_vit_large_patch14_336() -> CLIPConfig:
    """openai/clip-vit-large-patch14-336."""
    return CLIPConfig(
        vision=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=336, patch_size=14),
        text=CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12, eos_token_id=2),
        projection_dim=768,
    )


def llava_1_5_7b(lora: LoRAConfig = LoRAConfig()) -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf (Vicuna-7B v1.5 + CLIP ViT-L/14-336)."""
    return LlavaConfig(
        vision=clip_vit_large_patch14_336().vision,
        text=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001),
        lora=lora,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
