"""LLaVA-1.5 / CLIP / BLIP image preprocessing with numpy and PIL only.

The result equals transformers' PIL-backend image processors (`LlavaImageProcessorPil`,
`CLIPImageProcessorPil`, `BlipImageProcessorPil`; the only backend when torchvision is
absent) bit for bit on the
same input: same PIL resampling calls, same uint8 intermediate, same float64 rescale and
float32 normalise. Steps, each switchable by `ImageConfig` (`image_config.py`, which also
covers EXIF orientation, transparency and padding):

  to RGB -> pad to square with the mean colour -> resize (shortest edge, PIL bicubic)
  -> centre crop (zero pad if too small) -> rescale (x / 255) -> normalise ((x - mean) / std)

Output per image: float32 `[3, crop_h, crop_w]` (channels first, like HF `pixel_values`).

Huge images: pixels are processed like transformers does, so memory is that of the padded
square uint8 image (3 * side**2 bytes). Files beyond PIL's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`) raise `ImageLoadError` naming the file.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from fisao_jax.data.image_config import ImageConfig

ImageInput = Union[str, os.PathLike, PIL.Image.Image, np.ndarray]


class ImageLoadError(ValueError):
    """An image file could not be opened or decoded (the message names the file)."""


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
