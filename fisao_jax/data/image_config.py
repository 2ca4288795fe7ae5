"""`ImageConfig`: image preprocessing settings, and reading them from Hugging Face processor files.

Defaults are LLaVA-1.5 as trained; `fisao_jax.data.image` applies them. BLIP's processors
(InstructBLIP, BLIP-2) resize to an exact (height, width) and neither pad nor crop:
`ImageConfig(size=(h, w), pad_to_square=False, do_center_crop=False)`.

Two choices where "what transformers does" depends on how the image reaches it:

* **EXIF orientation.** An image processor given a PIL image ignores EXIF (so does the
  original LLaVA code, `Image.open(path).convert('RGB')`); given a *path string* it calls
  `transformers.image_utils.load_image`, which applies `ImageOps.exif_transpose`.
  Default here: `exif_transpose=False` (the PIL-image behaviour, which is also how LLaVA
  was trained). Set it True to get the path-string behaviour.
* **Transparency** (RGBA, LA, palette or L with a transparent colour). Given a PIL image,
  transformers composites it onto white (`alpha='white'`, the default here). Given a path
  string, `load_image` first calls `convert('RGB')`, which drops the alpha channel
  (`alpha='drop'`, also what the original LLaVA code does).

So `ImageConfig()` equals HF on `Image.open(path)`; `exif_transpose=True, alpha='drop'`
equals HF on the path string itself.

Pad to square: the original LLaVA-1.5 (`image_aspect_ratio='pad'`, `expand2square`) pads
with `int(255 * mean)`; transformers has it as `LlavaImageProcessor(do_pad=True)`. The
`llava-hf/llava-1.5-7b-hf` preprocessor_config.json is a `CLIPImageProcessor` without
`do_pad`, i.e. it does *not* pad. `ImageConfig()` (LLaVA-1.5 as trained) pads;
`ImageConfig.from_hf(folder)` follows the file unless told otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Processor types whose PIL path is exactly the pipeline of `fisao_jax.data.image`.
_SUPPORTED_HF_TYPES = (
    "CLIPImageProcessor",
    "CLIPImageProcessorPil",
    "CLIPImageProcessorFast",
    "LlavaImageProcessor",
    "LlavaImageProcessorPil",
    "LlavaImageProcessorFast",
    "BlipImageProcessor",
    "BlipImageProcessorPil",
    "BlipImageProcessorFast",
)
# Those without a centre crop (a `crop_size` in their file is ignored by transformers).
_NO_CROP_HF_TYPES = ("BlipImageProcessor", "BlipImageProcessorPil", "BlipImageProcessorFast")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Preprocessing settings. Defaults: LLaVA-1.5 as trained (CLIP ViT-L/14-336, pad).

    size: int -> resize so the shortest edge is `size` (aspect kept, long edge truncated
      like transformers); (height, width) -> resize to exactly that.
    crop: (height, width) of the centre crop.
    resample: PIL resampling filter id (3 = bicubic).
    alpha: 'white' (composite transparency onto white, transformers on PIL images) or
      'drop' (PIL `convert('RGB')`, transformers on path strings and original LLaVA).
    """

    size: int | tuple[int, int] = 336
    crop: tuple[int, int] = (336, 336)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1.0 / 255.0
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    pad_to_square: bool = True
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    exif_transpose: bool = False
    alpha: str = "white"

    def __post_init__(self):
        size = self.size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"ImageConfig.size must be an int or (height, width); got {size!r}")
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        elif int(size) < 1:
            raise ValueError(f"ImageConfig.size must be positive; got {size!r}")
        else:
            object.__setattr__(self, "size", int(size))
        crop = self.crop
        if isinstance(crop, (int, np.integer)):
            crop = (int(crop), int(crop))
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"ImageConfig.crop must be an int or (height, width); got {self.crop!r}")
        object.__setattr__(self, "crop", (int(crop[0]), int(crop[1])))
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"ImageConfig.{name} needs 3 values (R, G, B); got {value!r}")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.std):
            raise ValueError(f"ImageConfig.std must be non-zero; got {self.std!r}")
        if self.alpha not in ("white", "drop"):
            raise ValueError(f"ImageConfig.alpha must be 'white' or 'drop'; got {self.alpha!r}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image, `(3, height, width)` (needs do_center_crop, or a
        resize to an exact (height, width))."""
        if self.do_center_crop:
            return (3, self.crop[0], self.crop[1])
        if self.do_resize and isinstance(self.size, tuple):
            return (3, self.size[0], self.size[1])
        raise ValueError("output shape depends on the input image when do_center_crop=False and the resize "
                         "keeps the aspect ratio")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Pad colour in uint8, `int(255 * mean)` as in LLaVA's `expand2square`."""
        return tuple(int(m * 255) for m in self.mean)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageConfig":
        """Config from a plain dict (e.g. a config file for the synthetic world).

        Accepts this class's field names and the transformers names: `size` may be an int
        or `{"shortest_edge": n}` / `{"height", "width"}`; `crop` / `crop_size` an int or
        `{"height", "width"}`; `image_mean`, `image_std`, `do_pad` are aliases.
        Unknown keys raise, naming the key.
        """
        aliases = {"crop_size": "crop", "image_mean": "mean", "image_std": "std", "do_pad": "pad_to_square"}
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in dict(d).items():
            name = aliases.get(key, key)
            if name not in fields:
                raise ValueError(f"ImageConfig: unknown key {key!r} (known: {sorted(fields | set(aliases))})")
            if name == "size":
                value = _size_from_hf(value, key)
            elif name == "crop":
                value = _crop_from_hf(value, key)
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_hf(cls, path: str | os.PathLike, **overrides) -> "ImageConfig":
        """Config from a transformers `preprocessor_config.json` (file or its folder).

        Reproduces what the HF processor does with that file (e.g. no padding for the
        llava-hf CLIPImageProcessor file); `overrides` (field names) win, e.g.
        `pad_to_square=True` for LLaVA-1.5's training-time behaviour.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "preprocessor_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"preprocessor config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        kind = raw.get("image_processor_type", "CLIPImageProcessor")
        if kind not in _SUPPORTED_HF_TYPES:
            raise ValueError(f"{path}: image_processor_type {kind!r} is not supported "
                             f"(supported: {_SUPPORTED_HF_TYPES})")
        if raw.get("do_convert_rgb") is False:
            raise ValueError(f"{path}: do_convert_rgb=false is not supported (images are always converted to RGB)")
        kwargs: dict[str, Any] = {}
        try:
            if "size" in raw:
                kwargs["size"] = _size_from_hf(raw["size"], "size")
            if "crop_size" in raw:
                kwargs["crop"] = _crop_from_hf(raw["crop_size"], "crop_size")
            for hf_key, name in (("image_mean", "mean"), ("image_std", "std"), ("rescale_factor", "rescale_factor"),
                                 ("resample", "resample")):
                if hf_key in raw:
                    kwargs[name] = raw[hf_key]
            kwargs["pad_to_square"] = bool(raw.get("do_pad", False))
            if kind in _NO_CROP_HF_TYPES:
                kwargs["do_center_crop"] = False
                kwargs.setdefault("size", (384, 384))  # BlipImageProcessor's default
                raw = {k: v for k, v in raw.items() if k != "do_center_crop"}
            for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
                if flag in raw:
                    kwargs[flag] = bool(raw[flag])
            kwargs.update(overrides)
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def _size_from_hf(value: Any, key: str) -> int | tuple[int, int]:
    if isinstance(value, Mapping):
        if value.get("shortest_edge"):
            if value.get("longest_edge"):
                raise ValueError(f"{key}: 'longest_edge' is not supported")
            return int(value["shortest_edge"])
        if value.get("height") and value.get("width"):
            return (int(value["height"]), int(value["width"]))
        raise ValueError(f"{key}: need 'shortest_edge' or 'height'+'width', got {dict(value)!r}")
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[1]))
    return int(value)


def _crop_from_hf(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        raise ValueError(f"{key}: need 'height' and 'width', got {dict(value)!r}")
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))
