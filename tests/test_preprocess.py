"""serving.core.preprocess on real CIFAR-10 JPEGs and on every kind of awkward input."""

import io

import numpy as np
import pytest
from PIL import Image

from serving.core.preprocess import DecodeLimits, ImageError, decode_image, load_image, resize_for_model


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cat_bytes(cifar_test_dir):
    return sorted((cifar_test_dir / "cat").glob("*.jpg"))[0].read_bytes()


def test_real_jpeg_decodes_to_uint8_hwc(cat_bytes):
    array = load_image(cat_bytes, 160)
    assert array.dtype == np.uint8 and array.shape == (160, 160, 3)
    same = load_image(cat_bytes, 160)
    assert np.array_equal(array, same)  # deterministic
    native = load_image(cat_bytes, 32)
    assert np.array_equal(native, np.asarray(Image.open(io.BytesIO(cat_bytes)).convert("RGB")))  # no resize at 32


def test_resize_is_bicubic_without_crop():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 32, 32))  # left half red: must stay the left half after a non-cropping resize
    out = resize_for_model(image, 16)
    assert out.shape == (16, 16, 3)
    assert out[8, 2, 0] == 255 and out[8, 13, 0] == 0
    expected = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "1", "LA", "RGBA"])
def test_any_mode_becomes_rgb(mode):
    base = Image.new("RGB", (20, 10), (10, 120, 200))
    image = base.convert(mode) if mode not in ("I;16",) else Image.new("I;16", (20, 10), 1000)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    decoded = decode_image(_encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    array = np.asarray(decode_image(_encode(image, "PNG")))
    assert tuple(array[1, 1]) == (255, 255, 255)
    assert tuple(array[0, 0]) == (0, 0, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(_encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    array = np.asarray(decode_image(data))
    assert array[4, 4, 0] > 200 and array[4, 4, 2] < 50


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"definitely not an image", "unsupported_format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "decode_error"),
    ],
)
def test_bad_bytes_have_codes(data, code):
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.code == code and info.value.message


def test_truncated_jpeg_is_decode_error(cat_bytes):
    with pytest.raises(ImageError) as info:
        decode_image(cat_bytes[: len(cat_bytes) // 2])
    assert info.value.code == "decode_error"


def test_byte_limit(cat_bytes):
    with pytest.raises(ImageError) as info:
        decode_image(cat_bytes, DecodeLimits(max_bytes=100))
    assert info.value.code == "too_large"


def test_pixel_limit_rejects_before_decoding():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")  # small file, 9 Mpx
    with pytest.raises(ImageError) as info:
        decode_image(data, DecodeLimits(max_pixels=1_000_000))
    assert info.value.code == "too_large"
    assert decode_image(data, DecodeLimits(max_pixels=10_000_000)).size == (3000, 3000)


def test_decompression_bomb_is_too_large():
    data = _encode(Image.new("1", (20000, 20000)), "PNG")  # 400 Mpx above Pillow's own hard limit
    with pytest.raises(ImageError) as info:
        decode_image(data, DecodeLimits(max_pixels=10**10))
    assert info.value.code == "too_large"
