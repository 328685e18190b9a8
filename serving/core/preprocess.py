"""Image decoding and resizing in one place, shared by serving, labelling and training's evaluation.

Why one place: a cluster id is only meaningful if every host (and the evaluation at train time) feeds the model the
same pixels. Decisions:
- decode with Pillow, apply the EXIF orientation, keep only the first frame of animations (GIF/WebP/APNG/TIFF pages);
- any mode → RGB; an image with transparency is composited on a WHITE background (transparent pixels become
  white rather than whatever colour the encoder left behind them, which is usually black or garbage);
- limits: `max_bytes` on the encoded data, `max_pixels` on the decoded size, checked from the header before any
  pixel is decoded (Pillow's own `DecompressionBombError` also becomes `too_large`);
- resize: bicubic to `size × size`, no crop, no aspect preservation (CIFAR-style square inputs; it is what training
  evaluates with), output uint8 HWC RGB. Normalisation happens inside the ONNX model.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIB = 1 << 20


class ImageError(Exception):
    """A per-image failure with a stable code (`decode_error`, `too_large`, `unsupported_format`, `empty`,
    `bad_request`) that hosts turn into `{"error": {"code", "message"}}` without failing other images."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 20 * MIB
    max_pixels: int = 40_000_000


_WHITE = (255, 255, 255)


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode encoded image bytes to an RGB, EXIF-transposed Pillow image, or raise `ImageError`."""
    if data is None or len(data) == 0:
        raise ImageError("empty", "the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", f"the image has {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked right after reading the header (before decoding); Pillow's global
            # warning is silenced (not thread-safe to retune per call) and its hard error still maps to
            # too_large.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    "too_large", f"the image has {width}x{height} pixels; the limit is {limits.max_pixels}"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # first frame of an animation / first page of a multi-page file
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_known_image(data):  # a known signature that Pillow cannot parse: a broken file
            raise ImageError("decode_error", "the image header is corrupt") from exc
        raise ImageError("unsupported_format", "not an image format Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise ImageError("decode_error", f"the image could not be decoded: {exc}") from exc
    except Exception as exc:  # a codec bug must still be a per-image error, never a failed batch
        raise ImageError("decode_error", f"the image could not be decoded: {type(exc).__name__}: {exc}") from exc
    with contextlib.suppress(Exception):  # a broken EXIF block must not reject an otherwise good image
        image = ImageOps.exif_transpose(image) or image
    return to_rgb(image)


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_known_image(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB; transparency is composited on white (see the module docstring)."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale: rescale to 8 bits instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def resize_for_model(image: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize to `size × size` without crop → uint8 array [size, size, 3] (deterministic)."""
    if image.mode != "RGB":
        image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array.reshape(size, size, 3))


def load_image(data: bytes, size: int, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode + resize: encoded bytes → uint8 [size, size, 3], or raise `ImageError`."""
    return resize_for_model(decode_image(data, limits), size)
