import io

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from alexnet.imaging import BadImage, decode_rgb, encode_jpeg, resize_center_crop, resized_shape


def _jpeg(pixels: np.ndarray, mode: str = "RGB", fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("w,h", [(60, 200), (500, 375), (375, 500), (256, 256), (300, 300), (1200, 90)])
def test_resize_center_crop_matches_torchvision_reference(w, h):
    rng = np.random.default_rng(1)
    # smooth content so that sub-pixel differences between the two size roundings stay small
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    ours = resize_center_crop(img, 64)
    ref = np.asarray(TF.center_crop(TF.resize(img, 64, interpolation=TF.InterpolationMode.BICUBIC), 64))
    assert ours.shape == (64, 64, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 3.0


def test_geometry_keeps_the_central_square():
    # R channel encodes the source column: 512x256 -> 256x128 -> central 128 = source columns 128..383
    x = np.arange(512)
    pixels = np.zeros((256, 512, 3), np.uint8)
    pixels[..., 0] = (x // 2)[None, :]
    out = resize_center_crop(Image.fromarray(pixels), 128)
    assert abs(int(out[64, 0, 0]) - 64) <= 2
    assert abs(int(out[64, 127, 0]) - 191) <= 2
    assert resized_shape(512, 256, 128) == (256, 128)
    assert resized_shape(60, 200, 256) == (256, 853)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "CMYK", "P", "1"])
def test_every_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG"
    img = decode_rgb(_jpeg(_noise(40, 50), mode, fmt))
    assert img.mode == "RGB" and img.size == (50, 40)


def test_palette_with_transparency_and_png_named_jpeg_decode_by_content():
    pal = Image.fromarray(_noise(30, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    assert decode_rgb(buf.getvalue()).mode == "RGB"  # bytes only: the file name never matters


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.array([[0, 32896, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    rgb = np.asarray(decode_rgb(buf.getvalue()))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_cmyk_jpeg_colours_survive():
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 220
    rgb = np.asarray(decode_rgb(_jpeg(red, "CMYK")))
    assert rgb[..., 0].mean() > 180 and rgb[..., 1].mean() < 60


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is not an image\n", "not an image"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
])
def test_broken_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_rgb(data)


def test_truncated_jpeg_is_rejected():
    good = _jpeg(_noise(200, 300))
    with pytest.raises(BadImage, match="truncated"):
        decode_rgb(good[: len(good) // 2], 64)


def test_draft_decodes_large_jpegs_smaller_with_the_same_result():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    data = _jpeg(np.asarray(img.resize((2000, 1500), Image.Resampling.BICUBIC)), quality=95)
    drafted = decode_rgb(data, 256, draft=True)
    full = decode_rgb(data, 256, draft=False)
    assert drafted.size == (1000, 750) and full.size == (2000, 1500)  # 1/2 scale keeps >= 2x the target
    diff = resize_center_crop(drafted, 256).astype(int) - resize_center_crop(full, 256).astype(int)
    assert np.abs(diff).mean() < 1.0


def test_encode_roundtrip_is_close():
    pixels = resize_center_crop(Image.fromarray(_noise(100, 100)).resize((300, 200)), 64)
    back = np.asarray(Image.open(io.BytesIO(encode_jpeg(pixels, 95))))
    assert back.shape == (64, 64, 3)


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (1024, 768), (90, 1200)])
def test_central_resample_equals_rescale_then_crop(w, h):
    # resampling only the central box must give what rescaling the whole image and cropping gives
    base = np.random.default_rng(3).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    rw, rh = resized_shape(w, h, 128)
    left, top = (rw - 128) // 2, (rh - 128) // 2
    whole = np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + 128, top + 128)))
    diff = np.abs(resize_center_crop(img, 128).astype(int) - whole.astype(int))
    assert diff.mean() < 0.05 and diff.max() <= 2
