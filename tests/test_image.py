"""Image preprocessing equals transformers' LLaVA / CLIP image processors (PIL backend)."""
import json

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from fisao_jax.data import image as img
from fisao_jax.data.image_config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageConfig

transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil  # noqa: E402

# llava-hf/llava-1.5-7b-hf preprocessor_config.json as published (a CLIPImageProcessor, no do_pad).
LLAVA_HF_PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def hf_llava(do_pad=True, size=336, crop=336, **kw):
    """transformers' LLaVA-1.5 image processor, built offline with explicit settings."""
    settings = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), **kw}
    return LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}, resample=3,
        rescale_factor=1 / 255, do_pad=do_pad, **settings)


def hf_pixels(processor, image):
    return processor(image, return_tensors="np")["pixel_values"][0]


def scene(height, width, seed=0):
    """A 'real-looking' RGB picture: smooth gradients, sensor noise, a few solid shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([
        120 + 100 * np.sin(x / max(width, 1) * 3 + seed),
        100 + 80 * (y / max(height, 1)),
        60 + 90 * np.cos((x + y) / max(height + width, 1) * 4),
    ], axis=-1)
    base += rng.normal(0, 12, size=base.shape)
    picture = PIL.Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(picture)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, max(width, 2), size=2))
        y0, y1 = sorted(rng.integers(0, max(height, 2), size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour, outline=(0, 0, 0))
    return picture


def in_mode(picture, mode, seed=0):
    if mode == "RGBA":
        rng = np.random.default_rng(seed + 1)
        h, w = picture.height, picture.width
        alpha = np.clip(255 * np.linspace(0, 1, w)[None, :] + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(np.dstack([np.asarray(picture), alpha]), "RGBA")
    if mode == "P_transparent":
        palette_image = picture.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=64)
        palette_image.info["transparency"] = 3
        return palette_image
    if mode == "P":
        return picture.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=200)
    return picture.convert(mode)


SIZES = [(480, 640), (640, 427), (336, 336), (1, 1), (3, 500), (500, 3), (37, 1001)]
MODES = ["RGB", "L", "RGBA", "P", "P_transparent", "LA", "CMYK", "1"]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("do_pad", [True, False])
def test_matches_transformers_across_sizes_and_modes(height, width, do_pad):
    processor = hf_llava(do_pad=do_pad)
    config = ImageConfig(pad_to_square=do_pad)
    picture = scene(height, width, seed=height * 7 + width)
    for mode in MODES:
        image = in_mode(picture, mode)
        ours = img.preprocess_image(image, config)
        expected = hf_pixels(processor, image)
        assert ours.dtype == np.float32 and ours.shape == (3, 336, 336)
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0, err_msg=f"{mode} {height}x{width}")


def test_huge_image_matches_transformers():
    picture = scene(2300, 3100, seed=5)
    np.testing.assert_allclose(img.preprocess_image(picture), hf_pixels(hf_llava(), picture), atol=1e-5, rtol=0)


def test_one_pixel_image_by_hand():
    # A 1x1 image stays one colour through padding and resizing: (c / 255 - mean) / std.
    colour = (200, 10, 128)
    out = img.preprocess_image(PIL.Image.new("RGB", (1, 1), colour))
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    np.testing.assert_allclose(out.reshape(3, -1), np.repeat(np.array(expected)[:, None], 336 * 336, 1), atol=1e-5)


def test_pad_colour_is_llava_mean_colour():
    # A 1x4 white strip padded to 4x4: rows 0, 2, 3 are LLaVA's expand2square colour (122, 116, 104).
    padded = img.pad_to_square(np.full((1, 4, 3), 255, np.uint8), ImageConfig().pad_color)
    assert ImageConfig().pad_color == (122, 116, 104)
    assert padded.shape == (4, 4, 3)
    assert (padded[1] == 255).all() and (padded[[0, 2, 3]] == (122, 116, 104)).all()


def test_small_synthetic_world_config_and_crop_larger_than_resize():
    config = ImageConfig.from_dict({"size": 64, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    processor = hf_llava(size=64, crop=64, do_pad=True, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    picture = scene(50, 90, seed=3)
    np.testing.assert_allclose(img.preprocess_image(picture, config), hf_pixels(processor, picture), atol=1e-5, rtol=0)
    # Crop bigger than the resized image: transformers zero-pads before normalising.
    config = ImageConfig.from_dict({"size": 40, "crop_size": {"height": 48, "width": 56}, "do_pad": False})
    processor = LlavaImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 48, "width": 56}, resample=3,
                                       do_pad=False)
    out = img.preprocess_image(picture, config)
    assert out.shape == (3, 48, 56)
    np.testing.assert_allclose(out, hf_pixels(processor, picture), atol=1e-5, rtol=0)


def test_numpy_inputs_match_transformers():
    processor = hf_llava()
    rgb = np.asarray(scene(120, 200, seed=9))
    rgba = np.dstack([rgb, np.linspace(0, 255, 200, dtype=np.uint8)[None, :].repeat(120, 0)])
    gray = rgb[..., :1].copy()
    for array in (rgb, rgba, gray):
        np.testing.assert_allclose(img.preprocess_image(array), hf_pixels(processor, array), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(img.preprocess_image(gray[..., 0]), img.preprocess_image(gray))


def test_batch_helper_matches_per_image_transformers():
    processor = hf_llava()
    pictures = [in_mode(scene(h, w, seed=h), mode) for (h, w), mode in zip(SIZES, MODES)]
    expected = np.stack([hf_pixels(processor, p) for p in pictures])
    for workers in (0, 3):
        batch = img.preprocess_batch(pictures, num_workers=workers)
        assert batch.shape == (len(pictures), 3, 336, 336) and batch.dtype == np.float32
        np.testing.assert_allclose(batch, expected, atol=1e-5, rtol=0)


def rotated_jpeg(path, orientation=6):
    picture = scene(90, 160, seed=11)
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    picture.save(path, quality=92, exif=exif)


def test_exif_default_is_transformers_on_pil_images(tmp_path):
    path = tmp_path / "rotated.jpg"
    rotated_jpeg(path)
    opened = PIL.Image.open(path)
    expected = hf_pixels(hf_llava(do_pad=False), opened)
    config = ImageConfig(pad_to_square=False)
    np.testing.assert_allclose(img.preprocess_image(PIL.Image.open(path), config), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(img.preprocess_image(path, config), expected, atol=1e-5, rtol=0)


def test_exif_and_alpha_drop_option_is_transformers_on_path_strings(tmp_path):
    # Given a path string, transformers' load_image applies EXIF orientation and drops alpha.
    rotated = tmp_path / "rotated.jpg"
    rotated_jpeg(rotated)
    translucent = tmp_path / "translucent.png"
    in_mode(scene(70, 50, seed=2), "RGBA").save(translucent)
    processor = hf_llava(do_pad=False)
    config = ImageConfig(pad_to_square=False, exif_transpose=True, alpha="drop")
    for path in (rotated, translucent):
        expected = hf_pixels(processor, str(path))
        np.testing.assert_allclose(img.preprocess_image(path, config), expected, atol=1e-5, rtol=0)
    # ... and the two options really change the result on these files.
    default = ImageConfig(pad_to_square=False)
    assert np.abs(img.preprocess_image(translucent, default) - img.preprocess_image(translucent, config)).max() > 0.1
    assert np.abs(img.preprocess_image(rotated, default) - img.preprocess_image(rotated, config)).max() > 0.1


def test_from_hf_reads_llava_hf_file_and_matches_clip_processor(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA_HF_PREPROCESSOR_CONFIG))
    config = ImageConfig.from_hf(tmp_path)
    assert not config.pad_to_square and config.size == 336 and config.crop == (336, 336)
    clip = CLIPImageProcessorPil(**{k: v for k, v in LLAVA_HF_PREPROCESSOR_CONFIG.items()
                                    if k not in ("image_processor_type", "processor_class")})
    picture = scene(300, 520, seed=4)
    np.testing.assert_allclose(img.preprocess_image(picture, config), hf_pixels(clip, picture), atol=1e-5, rtol=0)
    padded = ImageConfig.from_hf(tmp_path / "preprocessor_config.json", pad_to_square=True)
    np.testing.assert_allclose(img.preprocess_image(picture, padded), hf_pixels(hf_llava(), picture), atol=1e-5)


def test_from_hf_reads_a_file_written_by_transformers(tmp_path):
    processor = hf_llava(size=48, crop=32, do_pad=True, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.6, 0.7])
    processor.save_pretrained(tmp_path)
    config = ImageConfig.from_hf(tmp_path)
    assert config.pad_to_square and config.size == 48 and config.crop == (32, 32)
    picture = scene(64, 100, seed=8)
    np.testing.assert_allclose(img.preprocess_image(picture, config), hf_pixels(processor, picture), atol=1e-5, rtol=0)


def test_bad_configs_and_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown key 'sise'"):
        ImageConfig.from_dict({"sise": 64})
    with pytest.raises(ValueError, match="mean needs 3 values"):
        ImageConfig(mean=(0.5,))
    bad_json = tmp_path / "preprocessor_config.json"
    bad_json.write_text('{"size": 336,\n "crop_size": }')
    with pytest.raises(ValueError, match=r"preprocessor_config.json: invalid JSON at line 2"):
        ImageConfig.from_hf(tmp_path)
    bad_json.write_text(json.dumps({"image_processor_type": "LlavaNextImageProcessor"}))
    with pytest.raises(ValueError, match="LlavaNextImageProcessor"):
        ImageConfig.from_hf(bad_json)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageConfig.from_hf(tmp_path / "nowhere")
    with pytest.raises(img.ImageLoadError, match="missing.jpg"):
        img.preprocess_image(tmp_path / "missing.jpg")
    truncated = tmp_path / "truncated.jpg"
    scene(200, 200).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:800])
    with pytest.raises(img.ImageLoadError, match="truncated.jpg"):
        img.preprocess_image(truncated)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    with pytest.raises(img.ImageLoadError, match="notes.jpg"):
        img.preprocess_image(not_image)
    big = tmp_path / "big.png"
    scene(100, 100).save(big)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(img.ImageLoadError, match="big.png.*MAX_IMAGE_PIXELS"):
        img.load_image(big)
    with pytest.raises(TypeError, match="uint8"):
        img.preprocess_image(np.zeros((4, 4, 3), np.float32))
