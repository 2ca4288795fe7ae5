"""BLIP-family configurations: the ViT-g vision tower, the Q-Former, InstructBLIP (Vicuna)
and BLIP-2's image-text retrieval model, with their construction from Hugging Face configs.

`*_from_hf` accept a `transformers` config object or a `config.json` dict. `config_io.from_dict`
knows these classes (see `CLASSES`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fisao_jax.models.configs import LlamaConfig, LoRAConfig, _get, _subconfig, llama_from_hf


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
    """The BLIP / BLIP-2 / InstructBLIP vision transformer (EVA ViT-g/14 by default)."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """The BERT-style Q-Former. `encoder_hidden_size` is the vision width it cross-attends to;
    layer i has cross-attention when i % cross_attention_frequency == 0. The vocabulary and
    positions are those of its text embeddings (BERT uncased + '[DEC]' = 30523)."""

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


@dataclasses.dataclass(frozen=True)
class InstructBlipConfig:
    """InstructBLIP with a LLaMA (Vicuna) language model. The prompt holds `num_query_tokens`
    tokens with id `image_token_id` per image, replaced by the projected Q-Former outputs."""

    vision: BlipVisionConfig = BlipVisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    text: LlamaConfig = LlamaConfig()
    lora: LoRAConfig = LoRAConfig()
    num_query_tokens: int = 32
    image_token_id: int = 32001

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image in the input ids (one per query token)."""
        return self.num_query_tokens


@dataclasses.dataclass(frozen=True)
class Blip2RetrievalConfig:
    """BLIP-2's image-text retrieval model (`Blip2ForImageTextRetrieval`): the contrastive
    (ITC) projections to `image_text_hidden_size` and the 2-way matching (ITM) head.
    `image_token_id` is only recorded: when set, transformers strips `num_query_tokens`
    leading ids from its text input; our text input never holds them."""

    vision: BlipVisionConfig = BlipVisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_id: Optional[int] = None


CLASSES = {c.__name__: c for c in (BlipVisionConfig, QFormerConfig, InstructBlipConfig, Blip2RetrievalConfig)}


# ----------------------------------------------------------------------------- HF parsing

def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision_config.{name} must be square, got {list(value)}")
        return int(value[0])
    return int(value)


def blip_vision_from_hf(cfg: Any) -> BlipVisionConfig:
    return BlipVisionConfig(
        hidden_size=_get(cfg, "hidden_size", 1408),
        intermediate_size=_get(cfg, "intermediate_size", 6144),
        num_hidden_layers=_get(cfg, "num_hidden_layers", 39),
        num_attention_heads=_get(cfg, "num_attention_heads", 16),
        image_size=_square(_get(cfg, "image_size", 224), "image_size"),
        patch_size=_square(_get(cfg, "patch_size", 14), "patch_size"),
        layer_norm_eps=_get(cfg, "layer_norm_eps", 1e-6),
        hidden_act=_get(cfg, "hidden_act", "gelu"),
        qkv_bias=bool(_get(cfg, "qkv_bias", True)),
    )


def qformer_from_hf(cfg: Any, encoder_hidden_size: int) -> QFormerConfig:
    """`encoder_hidden_size` is the vision width (transformers overwrites the Q-Former's own)."""
    freq = _get(cfg, "cross_attention_frequency", 2)
    if freq < 1:
        raise ValueError(f"qformer_config.cross_attention_frequency must be >= 1, got {freq}")
    return QFormerConfig(
        vocab_size=_get(cfg, "vocab_size", 30522),
        hidden_size=_get(cfg, "hidden_size", 768),
        num_hidden_layers=_get(cfg, "num_hidden_layers", 12),
        num_attention_heads=_get(cfg, "num_attention_heads", 12),
        intermediate_size=_get(cfg, "intermediate_size", 3072),
        hidden_act=_get(cfg, "hidden_act", "gelu"),
        max_position_embeddings=_get(cfg, "max_position_embeddings", 512),
        layer_norm_eps=_get(cfg, "layer_norm_eps", 1e-12),
        cross_attention_frequency=freq,
        encoder_hidden_size=encoder_hidden_size,
    )


def instructblip_from_hf(cfg: Any, lora: LoRAConfig = LoRAConfig()) -> InstructBlipConfig:
    """Our config from transformers' `InstructBlipConfig` (LLaMA / Vicuna language models only)."""
    text = _subconfig(cfg, "text_config")
    if _get(text, "model_type", "llama") != "llama":
        raise ValueError(f"unsupported InstructBLIP text model {_get(text, 'model_type')!r} (expected 'llama'; "
                         f"the Flan-T5 variants are encoder-decoders)")
    image_token = _get(cfg, "image_token_index", _get(cfg, "image_token_id", None))
    if image_token is None:
        raise ValueError("InstructBLIP config has no image_token_index: the prompt's image tokens cannot be found "
                         "(set it to the tokenizer's '<image>' id)")
    vision = blip_vision_from_hf(_subconfig(cfg, "vision_config"))
    text_cfg = llama_from_hf(text)
    if text_cfg.pad_token_id is None and _get(cfg, "pad_token_id", None) is not None:
        text_cfg = dataclasses.replace(text_cfg, pad_token_id=_get(cfg, "pad_token_id"))
    return InstructBlipConfig(
        vision=vision,
        qformer=qformer_from_hf(_subconfig(cfg, "qformer_config"), vision.hidden_size),
        text=text_cfg,
        lora=lora,
        num_query_tokens=_get(cfg, "num_query_tokens", 32),
        image_token_id=int(image_token),
    )


def blip2_retrieval_from_hf(cfg: Any) -> Blip2RetrievalConfig:
    """Our config from transformers' `Blip2Config` of a `Blip2ForImageTextRetrieval` checkpoint."""
    qformer = _subconfig(cfg, "qformer_config")
    if not _get(qformer, "use_qformer_text_input", False):
        raise ValueError("BLIP-2 retrieval needs qformer_config.use_qformer_text_input = true (the Q-Former "
                         "encodes the text with its text feed-forward layers)")
    vision = blip_vision_from_hf(_subconfig(cfg, "vision_config"))
    return Blip2RetrievalConfig(
        vision=vision,
        qformer=qformer_from_hf(qformer, vision.hidden_size),
        num_query_tokens=_get(cfg, "num_query_tokens", 32),
        image_text_hidden_size=_get(cfg, "image_text_hidden_size", 256),
        image_token_id=_get(cfg, "image_token_index", None),
    )


# ----------------------------------------------------------------------------- real sizes

def eva_vit_g() -> BlipVisionConfig:
    """The EVA ViT-g/14 of BLIP-2 and InstructBLIP at 224 px (39 layers, 1408 wide)."""
    return BlipVisionConfig()


def _vicuna(hidden: int, intermediate: int, layers: int, heads: int) -> LlamaConfig:
    # InstructBLIP's Vicuna v1.1: 2048 positions, eps 1e-6; 32000 pieces + '[PAD]' (32000)
    # + '<image>' (32001), the layout of the hub checkpoints since transformers' processors
    # expand image tokens.
    return LlamaConfig(vocab_size=32002, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=hidden // heads, max_position_embeddings=2048, rms_norm_eps=1e-6)


def instructblip_vicuna_7b(lora: LoRAConfig = LoRAConfig()) -> InstructBlipConfig:
    """Salesforce/instructblip-vicuna-7b."""
    return InstructBlipConfig(vision=eva_vit_g(), qformer=QFormerConfig(), text=_vicuna(4096, 11008, 32, 32),
                              lora=lora, num_query_tokens=32, image_token_id=32001)


def instructblip_vicuna_13b(lora: LoRAConfig = LoRAConfig()) -> InstructBlipConfig:
    """Salesforce/instructblip-vicuna-13b."""
    return InstructBlipConfig(vision=eva_vit_g(), qformer=QFormerConfig(), text=_vicuna(5120, 13824, 40, 40),
                              lora=lora, num_query_tokens=32, image_token_id=32001)


def blip2_itm_vit_g() -> Blip2RetrievalConfig:
    """Salesforce/blip2-itm-vit-g (the stage-1 BLIP-2 Q-Former with its ITC / ITM heads)."""
    return Blip2RetrievalConfig(vision=eva_vit_g(), qformer=QFormerConfig(), num_query_tokens=32,
                                image_text_hidden_size=256)
