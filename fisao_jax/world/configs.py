"""Sizes and training settings of the synthetic world's pretrained models, and its pixels.

Plain frozen dataclasses; `to_dict` / `build_config_from_dict` convert to and from nested
dicts of JSON types (what an ml_collections `ConfigDict(...).to_dict()` gives back), so a
config file can hold them as `ConfigDict(to_dict(default_build_config()))`.

`pixel_values` is the one image normalisation of the world: CLIP pretraining, SFT, PPO and
evaluation all turn the uint8 scenes into model input with it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from fisao_jax.data.image import normalization_table
from fisao_jax.data.image_config import ImageConfig
from fisao_jax.data.synthetic import GRID, WorldConfig

PRETRAIN_SPLIT = "pretrain"
"""Split of the scenes CLIP and the SFT model are trained on."""
EVAL_SPLIT = "pretrain-eval"
"""Held-out split the build's quality report is measured on."""
DEFAULT_IMAGE_SIZE = 63
"""Scene side in pixels: a multiple of the 3x3 grid, so a 21-px patch is exactly one cell."""


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """SentencePiece BPE tokenizer shared by CLIP's text tower and the LLaMA.

    vocab_size: SentencePiece pieces incl. 3 controls and 256 bytes (so >= 260); <image>
      and <pad> come on top.
    num_scenes: scenes whose (hallucination-free) texts it is trained on.
    """

    vocab_size: int = 512
    num_scenes: int = 2000


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """Small CLIP (ViT vision tower + causal text tower) and its contrastive pretraining.

    Loss on each batch of `batch_size` scenes (see `pretrain_clip`):
      * scene <-> object-list text ("a photo of a ball and two cups.") InfoNCE, multi-positive;
      * `caption_weight` x the same between the first `caption_batch_size` scenes and their
        hallucination-free captions (so whole responses get meaningful scores too);
      * `presence_weight` x a sigmoid loss between each scene and "a photo of a {w}." for
        every class noun and plural w (label: w's class is in the scene), which ranks
        presence on one scale across scenes, as FiSAO's verifier uses it;
      * `patch_weight` x the same sigmoid loss between each patch token (projected) and
        the words, label: the object in that patch's grid cell (region-word alignment).
        With one patch per cell it teaches the patch features LLaVA reads what they show.

    patch_size None = one patch per grid cell (image_size / 3): each image token then holds
    at most one whole object, which a small ViT learns many times faster than patches
    straddling objects.
    """

    patch_size: Optional[int] = None
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 512
    text_max_len: int = 64
    projection_dim: int = 128
    num_scenes: int = 10000
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    presence_weight: float = 10.0
    patch_weight: float = 10.0
    caption_weight: float = 0.5
    caption_batch_size: int = 32
    object_text_len: int = 20
    caption_text_len: int = 48
    eval_scenes: int = 500


@dataclasses.dataclass(frozen=True)
class SftSettings:
    """Small LLaVA (the CLIP's frozen vision tower + projector + LLaMA) and its SFT.

    The projector and the whole LLaMA are trained on the biased captions (loss on the
    response tokens, EOS included). Responses are right-padded to the smallest of
    `response_buckets` that holds them (one compiled step per bucket); longer ones are
    dropped and counted. `system` None gives the short prompt
    "USER: <image>\\n{prompt} ASSISTANT:" (see `fisao_jax.data.prompts.format_prompt`).
    """

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    vision_feature_layer: int = -2
    max_position_embeddings: int = 256
    num_scenes: int = 10000
    steps: int = 700
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    response_buckets: tuple[int, ...] = (24, 64)
    paraphrase_prompts: bool = True
    system: Optional[str] = None
    eval_scenes: int = 300
    max_new_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class WorldBuildConfig:
    """Everything that decides the pretrained artifacts (the cache key is made from it).

    seed: scene seed of the pretraining data and the parameter-init / batching seed.
    """

    world: WorldConfig = WorldConfig(image_size=DEFAULT_IMAGE_SIZE)
    tokenizer: TokenizerSettings = TokenizerSettings()
    clip: ClipSettings = ClipSettings()
    sft: SftSettings = SftSettings()
    seed: int = 0

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"WorldBuildConfig.{field}: {why}")

        if self.tokenizer.vocab_size < 260:
            bad("tokenizer.vocab_size", f"{self.tokenizer.vocab_size} < 260 (3 controls + 256 bytes come first)")
        if self.clip.patch_size is None and self.world.image_size % GRID:
            bad("world.image_size", f"{self.world.image_size} is not a multiple of {GRID}: with clip.patch_size None "
                                    f"(one patch per grid cell) use e.g. {DEFAULT_IMAGE_SIZE}, or set clip.patch_size")
        if self.world.image_size % patch_size(self):
            bad("clip.patch_size", f"{self.clip.patch_size} does not divide world.image_size {self.world.image_size}")
        for name, width, heads in (("vision", self.clip.vision_width, self.clip.vision_heads),
                                   ("text", self.clip.text_width, self.clip.text_heads)):
            if width % heads:
                bad(f"clip.{name}_heads", f"{heads} does not divide clip.{name}_width {width}")
        if self.sft.hidden % self.sft.heads or self.sft.heads % self.sft.kv_heads:
            bad("sft.heads", f"need heads | hidden and kv_heads | heads, got hidden={self.sft.hidden} "
                             f"heads={self.sft.heads} kv_heads={self.sft.kv_heads}")
        if not -self.clip.vision_layers <= self.sft.vision_feature_layer <= self.clip.vision_layers:
            bad("sft.vision_feature_layer", f"{self.sft.vision_feature_layer} out of range for "
                                            f"{self.clip.vision_layers} vision layers")
        buckets = self.sft.response_buckets
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 2:
            bad("sft.response_buckets", f"{buckets!r} must be strictly increasing lengths >= 2")
        for field in ("object_text_len", "caption_text_len"):
            if getattr(self.clip, field) > self.clip.text_max_len:
                bad(f"clip.{field}", f"{getattr(self.clip, field)} > clip.text_max_len {self.clip.text_max_len}")
        if self.clip.patch_weight and (self.world.image_size // patch_size(self)) != GRID:
            bad("clip.patch_weight", f"the patch loss needs one patch per grid cell (patch size "
                                     f"{self.world.image_size // GRID} px); got {patch_size(self)} px: set "
                                     f"clip.patch_size None or clip.patch_weight 0")
        if not 0 <= self.clip.caption_batch_size <= self.clip.batch_size:
            bad("clip.caption_batch_size", f"{self.clip.caption_batch_size} not in [0, clip.batch_size]")
        for field in ("num_scenes", "steps", "batch_size"):
            for section in ("clip", "sft"):
                if getattr(getattr(self, section), field) < 1:
                    bad(f"{section}.{field}", "must be >= 1")
        if self.clip.batch_size > self.clip.num_scenes or self.sft.batch_size > self.sft.num_scenes:
            bad("batch_size", "a batch cannot be larger than the number of training scenes")


def patch_size(cfg: WorldBuildConfig) -> int:
    """The CLIP patch size in pixels (one grid cell when `clip.patch_size` is None)."""
    return cfg.clip.patch_size or cfg.world.image_size // GRID


def default_build_config(**world_overrides: Any) -> WorldBuildConfig:
    """The default sizes (the CPU demo); `world_overrides` replace WorldConfig fields."""
    return WorldBuildConfig(world=WorldConfig(**{"image_size": DEFAULT_IMAGE_SIZE, **world_overrides}))


def test_build_config(**world_overrides: Any) -> WorldBuildConfig:
    """Tiny sizes and few steps: a full build in seconds (tests, smoke runs)."""
    return WorldBuildConfig(
        world=WorldConfig(**{"image_size": 48, **world_overrides}),
        tokenizer=TokenizerSettings(vocab_size=320, num_scenes=200),
        clip=ClipSettings(vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64, text_width=32,
                          text_layers=1, text_heads=2, text_mlp=64, text_max_len=64, projection_dim=32,
                          num_scenes=256, steps=80, batch_size=32, lr=3e-3, caption_batch_size=8, warmup_steps=5,
                          eval_scenes=64),
        sft=SftSettings(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, num_scenes=256, steps=30,
                        batch_size=16, lr=3e-3, warmup_steps=5, response_buckets=(64,), eval_scenes=16,
                        max_new_tokens=24),
    )


# ----------------------------------------------------------------------------- dict round trip

def to_dict(cfg: WorldBuildConfig) -> dict:
    """Nested dict of JSON types (tuples become lists)."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def _section(cls, d: Mapping[str, Any], where: str):
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {sorted(names)})")
    kw = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kw[k] = v
    return cls(**kw)


def build_config_from_dict(d: Mapping[str, Any]) -> WorldBuildConfig:
    """Inverse of `to_dict`; missing keys take their defaults, unknown keys raise (naming them)."""
    d = dict(d)
    sections = {"world": WorldConfig, "tokenizer": TokenizerSettings, "clip": ClipSettings, "sft": SftSettings}
    unknown = sorted(set(d) - set(sections) - {"seed"})
    if unknown:
        raise ValueError(f"WorldBuildConfig: unknown key(s) {unknown} (known: {sorted(sections) + ['seed']})")
    kw = {name: _section(cls, d[name], f"WorldBuildConfig.{name}") for name, cls in sections.items() if name in d}
    if "seed" in d:
        kw["seed"] = int(d["seed"])
    return WorldBuildConfig(**kw)


# ----------------------------------------------------------------------------- pixels

def image_config(image_size: int) -> ImageConfig:
    """CLIP normalisation at the world's native size (no padding, resizing or cropping)."""
    s = int(image_size)
    return ImageConfig(size=(s, s), crop=(s, s), pad_to_square=False, do_resize=False, do_center_crop=True)


def pixel_values(images: np.ndarray, image_cfg: Optional[ImageConfig] = None) -> np.ndarray:
    """uint8 scenes [n, S, S, 3] -> float32 pixel_values [n, 3, S, S] (CLIP mean/std).

    Bit-identical to `fisao_jax.data.image.preprocess_batch(images, image_config(S))`, as
    one vectorised table lookup. `image_cfg` defaults to `image_config(S)` (OpenAI CLIP
    mean/std).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"pixel_values expects uint8 images [n, S, S, 3], got {images.dtype} {images.shape}")
    if image_cfg is None:
        image_cfg = image_config(images.shape[1])
    table = normalization_table(image_cfg)
    return table[np.arange(3)[None, :, None, None], np.transpose(images, (0, 3, 1, 2))]
