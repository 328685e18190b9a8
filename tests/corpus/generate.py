"""Generate the hostile-input corpus into a directory (nothing here is committed; tests call it into a tmp dir).

    .venv/bin/python tests/corpus/generate.py OUT_DIR      # writes OUT_DIR/<name> + OUT_DIR/manifest.json

Why generated, not hand-picked: every file is built from a rule (a seed, a size, a mode), so a new Pillow or a new
decoder bug is caught by the same inputs on every machine, and nobody has to trust a binary blob in the repository.

Each entry of the manifest: `name` (file name), `expect` (`"ok"` or the `ImageError` code the service must answer
with), `why` (one line), and for valid images an optional `same_as` (the name of an upright/plain twin whose result
must be identical: EXIF rotation, animation's first frame). The big ones are cheap: the 20,000 × 20,000 PNG is a
1-bit PNG written chunk by chunk (≈ 60 KB on disk, 400 Mpx declared) and the "bomb" declares 10⁵ × 10⁵ pixels in a
few dozen bytes; both must be refused from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20260101
SIZE = 64  # side of the small valid images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_1bit(width: int, height: int, rows_of_data: int | None = None) -> bytes:
    """A 1-bit greyscale PNG of `width × height` (all black), written row by row through a streaming compressor so
    that generating a 400 Mpx image costs a few MB of CPU work and ~60 KB of output. `rows_of_data` < height gives
    a file whose IDAT stops early (a declared size far beyond its data: the decompression-bomb shape)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" + b"\0" * ((width + 7) // 8)
    parts = []
    for _ in range(height if rows_of_data is None else rows_of_data):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def oriented_rgb(size: int = SIZE) -> np.ndarray:
    """An upright image whose content reveals its orientation: red top half, blue bottom half, a green block in the
    top-left corner (so a mirror is visible too)."""
    array = np.zeros((size, size, 3), np.uint8)
    array[: size // 2] = (220, 30, 30)
    array[size // 2 :] = (30, 30, 220)
    array[: size // 4, : size // 4] = (30, 200, 30)
    return array


def photo_like(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Smooth colourful content (a gradient + noise): realistic enough for every codec, deterministic."""
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def build_corpus() -> list[tuple[dict, bytes]]:
    """(manifest entry, file bytes) for every hostile or unusual input."""
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray(photo_like(rng))
    jpeg = _encode(rgb, "JPEG", quality=90)
    png = _encode(rgb, "PNG")
    items: list[tuple[dict, bytes]] = []

    def add(name: str, expect: str, why: str, data: bytes, **extra) -> None:
        items.append(({"name": name, "expect": expect, "why": why, **extra}, data))

    # --- not images / broken images ----------------------------------------------------------------------
    add("zero.bin", "empty", "zero bytes", b"")
    add("random.bin", "unsupported_format", "4 KiB of random bytes", rng.integers(0, 256, 4096, np.uint8).tobytes())
    add("text.jpg", "unsupported_format", "a text file named .jpg", b"this is not a JPEG\n" * 10)
    add("truncated.jpg", "decode_error", "a JPEG cut at 40 %", jpeg[: len(jpeg) * 2 // 5])
    add("truncated.png", "decode_error", "a PNG cut at 50 %", png[: len(png) // 2])
    add("header-only.png", "decode_error", "PNG signature + IHDR, nothing else", png[:33])
    add("signature-only.jpg", "decode_error", "a JPEG SOI marker and nothing else", b"\xff\xd8\xff")
    body = bytearray(png)
    idat = body.index(b"IDAT") + 8
    body[idat : idat + 64] = rng.integers(0, 256, 64, np.uint8).tobytes()  # CRC no longer matches
    add("corrupt-body.png", "decode_error", "valid PNG header, IDAT overwritten (bad CRC)", bytes(body))
    corrupt_jpeg = bytearray(jpeg)
    start = corrupt_jpeg.index(b"\xff\xda")  # start of scan: keep the headers, corrupt the entropy-coded data
    corrupt_jpeg[start + 20 :] = rng.integers(0, 256, len(corrupt_jpeg) - start - 20, np.uint8).tobytes()
    add(
        "corrupt-body.jpg",
        "ok|decode_error",
        "valid JPEG headers, random entropy-coded data (libjpeg may decode garbage pixels or refuse)",
        bytes(corrupt_jpeg),
    )
    # --- size attacks (refused from the header) -----------------------------------------------------------
    add(
        "bomb-100k.png",
        "too_large",
        "declares 100,000 × 100,000 px in a few hundred bytes",
        png_1bit(100_000, 100_000, 4),
    )
    add("huge-20k.png", "too_large", "a complete 20,000 × 20,000 1-bit PNG (400 Mpx, ~60 KB)", png_1bit(20_000, 20_000))
    gif_bomb = bytearray(_encode(Image.new("P", (8, 8)), "GIF"))
    gif_bomb[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen 65,535²
    add("bomb-screen.gif", "ok|too_large", "a GIF whose logical screen declares 65,535 × 65,535", bytes(gif_bomb))
    # --- valid but unusual --------------------------------------------------------------------------------
    add("plain.jpg", "ok", "a plain RGB JPEG", jpeg)
    add("plain.png", "ok", "a plain RGB PNG", png)
    add("cmyk.jpg", "ok", "a CMYK JPEG", _encode(rgb.convert("CMYK"), "JPEG", quality=95))
    grey16 = (np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE)).astype(np.uint16)
    add("grey16.png", "ok", "a 16-bit greyscale PNG", _encode(Image.fromarray(grey16), "PNG"))
    rgb16 = io.BytesIO()  # 16-bit per channel RGB: Pillow writes it only through raw PNG, so build it by hand
    rows = b"".join(b"\0" + row.tobytes() for row in (photo_like(rng).astype(">u2") * 257))
    rgb16.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", SIZE, SIZE, 16, 2, 0, 0, 0)))
    rgb16.write(_png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    add("rgb48.png", "ok", "a 16-bit-per-channel RGB PNG", rgb16.getvalue())
    add("palette.png", "ok", "a palette (P) PNG", _encode(rgb.quantize(16), "PNG"))
    palette_t = rgb.quantize(16)
    palette_t.info["transparency"] = 0
    add("palette-transparent.png", "ok", "a palette PNG with a transparent index", _encode(palette_t, "PNG"))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))))
    add("alpha.png", "ok", "an RGBA PNG with an alpha gradient", _encode(rgba, "PNG"))
    add("grey.jpg", "ok", "a greyscale JPEG", _encode(rgb.convert("L"), "JPEG"))
    add("grey-alpha.png", "ok", "an LA PNG", _encode(rgba.convert("LA"), "PNG"))
    add("bilevel.png", "ok", "a 1-bit PNG", _encode(rgb.convert("1"), "PNG"))
    add("tiny-1x1.png", "ok", "a 1 × 1 image", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    add(
        "tall-1x3000.png",
        "ok",
        "an extreme aspect ratio (1 × 3000)",
        _encode(Image.new("RGB", (1, 3000), (200, 9, 9)), "PNG"),
    )
    add("webp.webp", "ok", "a WebP", _encode(rgb, "WEBP"))
    add("bmp.bmp", "ok", "a BMP", _encode(rgb, "BMP"))
    add("tiff.tif", "ok", "a TIFF", _encode(rgb, "TIFF"))
    # --- first frame of an animation -----------------------------------------------------------------------
    frames = [
        Image.fromarray(np.full((SIZE, SIZE, 3), colour, np.uint8))
        for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))
    ]
    first = frames[0].quantize(4)
    add("first-frame.png", "ok", "the animation's first frame alone", _encode(first.convert("RGB"), "PNG"))
    add(
        "animated.gif",
        "ok",
        "a 3-frame animated GIF (red, green, blue): the first frame is the one classified",
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        same_as="first-frame.png",
    )
    # --- EXIF orientation ----------------------------------------------------------------------------------
    upright = oriented_rgb()
    add(
        "upright.png",
        "ok",
        "the orientation reference (red top, blue bottom, green top-left)",
        _encode(Image.fromarray(upright), "PNG"),
    )
    # Orientation 6 = "rotate 90° clockwise to display": store the content rotated 90° counter-clockwise.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    add(
        "exif-rot6.png",
        "ok",
        "stored sideways + EXIF Orientation=6 (PNG eXIf)",
        _encode(stored, "PNG", exif=exif),
        same_as="upright.png",
        upright=True,
    )
    add(
        "exif-rot6.jpg",
        "ok",
        "stored sideways + EXIF Orientation=6 (JPEG)",
        _encode(stored, "JPEG", quality=95, exif=exif),
        upright=True,
    )
    bad_exif = _encode(rgb, "JPEG", exif=b"Exif\0\0MM\0*\0\0\0\x08\xff\xff")  # an EXIF block that lies about its size
    add("broken-exif.jpg", "ok", "a JPEG with a broken EXIF block (the image itself is fine)", bad_exif)
    return items


def generate(directory: str | Path) -> list[dict]:
    """Write every corpus file + `manifest.json` into `directory`; returns the manifest."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for entry, data in build_corpus():
        (out / entry["name"]).write_bytes(data)
        manifest.append({**entry, "bytes": len(data)})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for row in generate(sys.argv[1]):
        print(f"{row['name']:28} {row['bytes']:>9} B  expect {row['expect']:18} {row['why']}")
