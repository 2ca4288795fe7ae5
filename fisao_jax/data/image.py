"""LLaVA-1.5 / CLIP / BLIP image preprocessing with numpy and PIL only.

The result equals transformers' PIL-backend image processors (`LlavaImageProcessorPil`,
`CLIPImageProcessorPil`, `BlipImageProcessorPil`; the only backend when torchvision is
absent) bit for bit on the
same input: same PIL resampling calls, same uint8 intermediate, same float64 rescale and
float32 normalise. Steps, each switchable by config:

  to RGB -> pad to square with the mean colour -> resize (shortest edge, PIL bicubic)
  -> centre crop (zero pad if too small) -> rescale (x / 255) -> normalise ((x - mean) / std)

Output per image: float32 `[3, crop_h, crop_w]` (channels first, like HF `pixel_values`).
BLIP's processors (InstructBLIP, BLIP-2) resize to an exact (height, width) and neither pad
nor crop: `ImageConfig(size=(h, w), pad_to_square=False, do_center_crop=False)`.

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

Huge images: pixels are processed like transformers does, so memory is that of the padded
square uint8 image (3 * side**2 bytes). Files beyond PIL's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`) raise `ImageLoadError` naming the file.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Processor types whose PIL path is exactly the pipeline above.
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

ImageInput = Union[str, os.PathLike, PIL.Image.Image, np.ndarray]


class ImageLoadError(ValueError):
    """An image file could not be opened or decoded (the message names the file)."""


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


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and fully decode an image file; `ImageLoadError` naming the file on failure."""
    path = os.fspath(path)
    try:
        image = PIL.Image.open(path)
        image.load()  # decode now so truncated files fail here, not mid-batch
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}") from None
    except PIL.Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: image too large for PIL's MAX_IMAGE_PIXELS limit ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"{path}: cannot read image ({e})") from None
    return image


CHECK_MODES = ("exists", "open", "decode")


def check_image_file(path: str | os.PathLike, mode: str = "open") -> str | None:
    """None if the file passes the check, else why it fails.

    mode: 'exists' (a file is there), 'open' (PIL parses its header) or 'decode' (full
    decode, catches truncated files).
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"image check mode must be one of {CHECK_MODES}, got {mode!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        return f"image file not found: {path}"
    if mode == "exists":
        return None
    try:
        if mode == "decode":
            load_image(path)
        else:
            with PIL.Image.open(path):  # parses the header only
                pass
    except ImageLoadError as e:
        return str(e)
    except (OSError, ValueError, SyntaxError) as e:
        return f"{path}: cannot read image ({e})"
    return None


def to_rgb(image: ImageInput, config: ImageConfig = ImageConfig()) -> np.ndarray:
    """Any supported input -> uint8 `[height, width, 3]`, as transformers converts it.

    Inputs: a path, a PIL image of any mode, or a uint8 array `[h, w]`, `[h, w, 1|3|4]`
    (channels last; 4 = RGBA, composited onto white with transformers' numpy formula).
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, PIL.Image.Image):
        if config.exif_transpose:
            image = PIL.ImageOps.exif_transpose(image)
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha and config.alpha == "white":
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(background, rgba)
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, config)
    raise TypeError(f"unsupported image input of type {type(image).__name__} (want a path, PIL image or uint8 array)")


def _array_to_rgb(array: np.ndarray, config: ImageConfig) -> np.ndarray:
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 [h, w, c]; got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be [h, w], [h, w, 1], [h, w, 3] or [h, w, 4]; got shape {array.shape}")
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 3:
        return array
    if config.alpha == "drop":
        return np.ascontiguousarray(array[..., :3])
    alpha = array[..., 3:4] / 255  # float64, as transformers' convert_to_rgb
    return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)


def pad_to_square(rgb: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """uint8 `[h, w, 3]` -> `[s, s, 3]`, s = max(h, w), image centred (extra pixel after)."""
    height, width, _ = rgb.shape
    if height == width:
        return rgb
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=rgb.dtype)
    out[...] = np.asarray(color, dtype=rgb.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top:top + height, left:left + width] = rgb
    return out


def resize_shape(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """Output (height, width) of the resize, transformers' rule (long edge truncated)."""
    if isinstance(size, tuple):
        return size
    if width <= height:
        return (int(size * height / width), size)
    return (size, int(size * width / height))


def center_crop(rgb: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Centre crop of uint8 `[h, w, c]` to `crop`; zero-padded where the image is smaller.

    Offsets as transformers: top = (h - ch) // 2; padding ceil((ch - h) / 2) before.
    """
    height, width = rgb.shape[:2]
    crop_h, crop_w = crop
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return rgb[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas = np.zeros((new_h, new_w) + rgb.shape[2:], dtype=rgb.dtype)
    canvas[pad_top:pad_top + height, pad_left:pad_left + width] = rgb
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def normalization_table(config: ImageConfig) -> np.ndarray:
    """float32 `[3, 256]`: the output value of each uint8 level per channel.

    Computed with transformers' exact arithmetic (float64 rescale then float32 cast,
    float32 normalise), so table lookup is bit-identical to applying the steps.
    """
    levels = np.arange(256, dtype=np.uint8)
    values = np.broadcast_to(levels, (3, 256))
    if config.do_rescale:
        values = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        values = values.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.mean, dtype=np.float32)[:, None]
        std = np.asarray(config.std, dtype=np.float32)[:, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def preprocess_image(image: ImageInput, config: ImageConfig = ImageConfig(),
                     table: np.ndarray | None = None) -> np.ndarray:
    """One image -> float32 `[3, crop_h, crop_w]` (channels first, like HF pixel_values).

    `table` is `normalization_table(config)`; pass it to skip recomputing it per image.
    """
    rgb = to_rgb(image, config)
    if config.pad_to_square:
        rgb = pad_to_square(rgb, config.pad_color)
    if config.do_resize:
        out_h, out_w = resize_shape(rgb.shape[0], rgb.shape[1], config.size)
        resized = PIL.Image.fromarray(rgb).resize((out_w, out_h), resample=config.resample)
        rgb = np.asarray(resized)
    if config.do_center_crop:
        rgb = center_crop(rgb, config.crop)
    if table is None:
        table = normalization_table(config)
    return table[np.arange(3)[:, None, None], np.transpose(rgb, (2, 0, 1))]


def preprocess_batch(images: Sequence[ImageInput], config: ImageConfig = ImageConfig(),
                     num_workers: int = 0) -> np.ndarray:
    """Images -> float32 `[batch, 3, height, width]` (`config.output_shape`).

    num_workers > 0 decodes/resizes in that many threads (PIL releases the GIL); results
    keep input order.
    """
    try:
        shape = config.output_shape
    except ValueError as e:
        raise ValueError(f"preprocess_batch needs images of one shape: {e}") from None
    table = normalization_table(config)
    out = np.empty((len(images),) + shape, dtype=np.float32)

    def work(i: int) -> None:
        out[i] = preprocess_image(images[i], config, table)

    if num_workers > 0 and len(images) > 1:
        with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
            list(pool.map(work, range(len(images))))
    else:
        for i in range(len(images)):
            work(i)
    return out
