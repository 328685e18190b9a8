"""Hostile inputs: the generated corpus (tests/corpus/generate.py) through the decode path, property-based fuzzing
of `serving.core.preprocess` and of both backends' request parsing, and hostile file names for the labeller. The
corpus through the real service (both backends, mixed with good images in one request, 1,000-image requests, odd
requests) is in tests/test_api.py.

The promise checked: every item gets a clear per-item error (a known code) or the correct result (the one the
in-process engine gives for the same bytes), its neighbours in the same request still succeed, and the worker's
memory stays bounded (the 400 Mpx PNG and the bomb are refused from their header, never decoded).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.core.preprocess import DecodeLimits, ImageError, decode_image, load_image

KNOWN_CODES = {"empty", "decode_error", "too_large", "unsupported_format", "bad_request"}
WORKER_RSS_GROWTH_LIMIT = 300 * (1 << 20)  # generous: one decoded 40 Mpx image would already be 120 MB


def _load_generator():
    spec = importlib.util.spec_from_file_location("corpus_generate", REPO_ROOT / "tests" / "corpus" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    directory = tmp_path_factory.mktemp("corpus")
    return directory, _load_generator().generate(directory)


def _data(corpus, name: str) -> bytes:
    return (corpus[0] / name).read_bytes()


def _allowed(entry: dict) -> set[str]:
    return set(entry["expect"].split("|"))


def test_training_reads_a_hostile_folder_as_serving_decodes_it(corpus):
    """`deepclust train DIR` on a folder holding the corpus: a file serving refuses is left out (at construction,
    listed with its reason) or names itself when decoded; every other file gives training exactly serving's pixels
    (orientation, transparency on white, 16-bit grey rescaled): no train/serve skew, and one bad file never stops a
    run with a traceback."""
    from training.data.datasets import IMAGE_EXTENSIONS, FolderDataset

    directory, manifest = corpus
    dataset = FolderDataset(directory)
    entries = {e["name"]: e for e in manifest if Path(e["name"]).suffix.lower() in IMAGE_EXTENSIONS}
    kept = {path.name: index for index, path in enumerate(dataset.paths)}
    assert set(kept) | set(dataset.skipped) == set(entries)
    assert {"text.jpg", "bomb-100k.png", "huge-20k.png"} <= set(dataset.skipped)
    for name, entry in entries.items():
        if name in dataset.skipped:  # only files serving may refuse
            assert _allowed(entry) != {"ok"}, (name, dataset.skipped[name])
            continue
        try:
            pixels = np.asarray(dataset.load(kept[name]))
        except ValueError as exc:
            assert name in str(exc), exc
            assert _allowed(entry) != {"ok"}, f"{name} decodes in serving but not in training: {exc}"
            continue
        served = np.asarray(decode_image(_data(corpus, name)))
        assert np.array_equal(pixels, served), name


# ------------------------------------------------------------------------------------------ decode path only
def test_every_corpus_item_decodes_or_fails_with_its_code(corpus):
    directory, manifest = corpus
    assert len(manifest) >= 30
    for entry in manifest:
        data = (directory / entry["name"]).read_bytes()
        try:
            array = load_image(data, 32)
            outcome = "ok"
            assert array.dtype == np.uint8 and array.shape == (32, 32, 3), entry["name"]
        except ImageError as exc:
            outcome = exc.code
            assert exc.message, entry["name"]
        assert outcome in _allowed(entry), f"{entry['name']}: got {outcome}, expected {entry['expect']}"
        if "same_as" in entry:
            twin = load_image(_data(corpus, entry["same_as"]), 32)
            assert np.array_equal(array, twin), f"{entry['name']} differs from {entry['same_as']}"


@pytest.mark.parametrize("name", ["exif-rot6.png", "exif-rot6.jpg"])
def test_exif_rotation_is_applied(corpus, name):
    """The stored pixels are sideways; after decoding, red must be on top, blue at the bottom, green top-left."""
    stored = np.asarray(Image.open(corpus[0] / name).convert("RGB"))
    assert stored[2, 32][0] < 100 < stored[2, 32][2] or stored[32, 2][0] < 100, "the fixture is not sideways"
    array = load_image(_data(corpus, name), 64).astype(int)
    top, bottom, corner = array[20, 40], array[50, 40], array[4, 4]
    assert top[0] > 150 and top[2] < 100, f"top is not red: {top}"
    assert bottom[2] > 150 and bottom[0] < 100, f"bottom is not blue: {bottom}"
    assert corner[1] > 150 and corner[0] < 100, f"top-left is not green: {corner}"


_PEAK_RSS_PROBE = """
import json, sys
from serving.core.preprocess import DecodeLimits, ImageError, load_image
from tests.corpus.generate import png_1bit


def peak_kib():  # VmHWM: this address space's peak RSS (ru_maxrss would inherit the parent's from the fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


load_image(png_1bit(64, 64), 32)  # plugins imported and warmed before the baseline
data = open(sys.argv[1], "rb").read()
limits = DecodeLimits(max_pixels=int(sys.argv[2]))
before = peak_kib()
try:
    load_image(data, 32, limits)
    code = "ok"
except ImageError as exc:
    code = exc.code
print(json.dumps({"code": code, "growth_mib": (peak_kib() - before) / 1024}))
"""


def _decode_peak_rss(path: Path, max_pixels: int = DecodeLimits.max_pixels) -> tuple[str, float]:
    """Decode one file in a fresh interpreter; (error code or "ok", growth of the process's peak RSS in MiB). Peak
    RSS sees Pillow's C allocations, which tracemalloc does not (it traced 0.05 MiB for a 137 MiB decode)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_PROBE, str(path), str(max_pixels)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    return result["code"], result["growth_mib"]


def test_big_images_are_refused_before_decoding(corpus, tmp_path):
    """The 20,000² PNG, the bombs and an 81 Mpx PNG (under Pillow's own limit, over ours) fail from the header:
    quickly and without their pixels ever being allocated (peak RSS of a fresh process)."""
    import time

    generator = _load_generator()
    between = tmp_path / "between-9k.png"
    between.write_bytes(generator.png_1bit(9000, 9000))
    control = tmp_path / "control-6k.png"
    control.write_bytes(generator.png_1bit(6000, 6000))
    # Positive control: a 36 Mpx image that IS decoded (1 byte/px in mode "1", then 3 bytes/px RGB) must show up.
    code, growth = _decode_peak_rss(control)
    assert code == "ok" and growth > 100, f"the probe cannot see a decode: {growth:.1f} MiB"
    for path in [corpus[0] / "huge-20k.png", corpus[0] / "bomb-100k.png", corpus[0] / "bomb-screen.gif", between]:
        started = time.perf_counter()
        code, growth = _decode_peak_rss(path)
        assert growth < 20, f"{path.name}: decoding was attempted, peak RSS grew by {growth:.0f} MiB"
        assert code == "too_large", (path.name, code)
        assert time.perf_counter() - started < 30


def test_our_pixel_limit_applies_below_pillows(corpus):
    """Between our max_pixels and Pillow's own bomb limit, our check (from the header) is what refuses."""
    generator = _load_generator()
    data = generator.png_1bit(9000, 9000)  # 81 Mpx: under Pillow's 179 Mpx error, over our 40 Mpx default
    with pytest.raises(ImageError) as info:
        load_image(data, 32)
    assert info.value.code == "too_large" and "40000000" in info.value.message
    assert load_image(data, 32, DecodeLimits(max_pixels=100_000_000)).shape == (32, 32, 3)


# ----------------------------------------------------------------------------------------------- property test
_SEED_IMAGES: list[bytes] = []


def _seeds() -> list[bytes]:
    if not _SEED_IMAGES:
        generator = _load_generator()
        wanted = {"plain.jpg", "plain.png", "animated.gif", "webp.webp", "tiff.tif", "exif-rot6.jpg", "bmp.bmp"}
        _SEED_IMAGES.extend(data for entry, data in generator.build_corpus() if entry["name"] in wanted)
    return _SEED_IMAGES


@st.composite
def mutated_images(draw):
    """A valid image with a few bytes overwritten, a cut, or bytes inserted: reaches deep into the decoders."""
    data = bytearray(draw(st.sampled_from(_seeds())))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048), mutated_images()))
def test_preprocess_never_raises_anything_but_image_error(data):
    limits = DecodeLimits(max_pixels=4_000_000)
    try:
        array = load_image(data, 24, limits)
    except ImageError as exc:
        assert exc.code in KNOWN_CODES and exc.message
    else:
        assert array.dtype == np.uint8 and array.shape == (24, 24, 3)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.fixed_dictionaries(
            {"images": st.lists(st.text(max_size=12) | _json_values, max_size=4)},
            optional={"top_k": st.floats() | _json_values},
        ),
        st.dictionaries(st.sampled_from(["images", "top_k", "x"]), _json_values, max_size=3),
        _json_values,
    ),
    st.none() | st.floats() | _json_values,
)
def test_handler_parses_any_json_request_without_raising(body, query_top_k):
    """Whatever JSON a client sends (TorchServe decodes it, `Infinity` and `1e999` included), parsing gives per-item
    errors or a request-level error, never an exception: one exception would fail every request of the batch."""
    from serving.hosts.torchserve.handler import DeepclustHandler

    request = {"body": body} if query_top_k is None else {"body": body, "top_k": query_top_k}
    parsed = DeepclustHandler().parse_request(request, "application/json")
    if parsed.request_error is not None:
        assert parsed.request_error.error.code == "bad_request" and not parsed.items
    else:
        assert parsed.items and all(isinstance(i, bytes) or i.error.code == "bad_request" for i in parsed.items)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=200), _json_values.map(lambda v: json.dumps(v).encode())),
    st.sampled_from(["application/json", "multipart/form-data; boundary=b", "multipart/form-data", "image/png", None]),
)
def test_engine_backend_parses_any_body_without_raising(body, content_type):
    """The engine backend's request parsing (`serving.hosts.engine_backend.requests`): whatever the body and its
    declared type, images, per-item errors or a request error, never an exception (it runs on the front's loop)."""
    from serving.hosts.engine_backend.requests import parse_request

    parsed = parse_request(body, content_type)
    if parsed.request_error is not None:
        assert not parsed.items and parsed.request_error
    else:
        assert parsed.items and all(isinstance(i, bytes | str) for i in parsed.items)


# ------------------------------------------------------------------------------------- hostile names: labeller
@pytest.fixture(scope="module")
def good_images(cifar_test_dir) -> list[bytes]:
    classes = sorted(p.name for p in cifar_test_dir.iterdir() if p.is_dir())
    return [p.read_bytes() for c in classes for p in sorted((cifar_test_dir / c).glob("*.jpg"))[:3]]


def test_labeller_survives_long_and_non_utf8_names(tiny_model_dir, good_images, tmp_path):
    """255-byte names (NAME_MAX), a path near PATH_MAX, non-UTF-8 bytes, a newline, and a literal backslash-x
    name that looks like an escaped byte: one row each, none lost, none duplicated, each mapping back to its file."""
    from serving.core.batch import fs_path
    from serving.hosts.labeller.labeller import read_rows

    root = tmp_path / "names"
    root.mkdir()
    broot = os.fsencode(root)
    names = [
        b"a" * 251 + b".jpg",  # 255 bytes: NAME_MAX
        "é".encode() * 125 + b".jpg",  # 254 bytes of valid multi-byte UTF-8
        b"caf\xe9.jpg",  # Latin-1
        b"\xff\xfe\xfd.png",  # no valid UTF-8 at all
        b"line\nbreak.jpg",
        b"-rf.jpg",
        b"tab\there.jpg",
        b"x\\xff.jpg",  # literal backslash, x, f, f: must not collide with the Latin-1 byte 0xff
        b"x\xff.jpg",
    ]
    deep = broot
    for level in range(14):  # ≈ 3,600 bytes of path: under PATH_MAX (4096)
        deep += b"/" + (b"d%02d" % level) * 60
    os.makedirs(deep)
    written = []
    for i, name in enumerate(names):
        path = broot + b"/" + name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(good_images[i])
        written.append(path)
    deep_file = deep + b"/deep.jpg"
    with open(deep_file, "wb") as fh:
        fh.write(good_images[-1])
    written.append(deep_file)

    out = tmp_path / "labels.jsonl"
    from typer.testing import CliRunner

    from deepclust.cli import app

    result = CliRunner().invoke(
        app, ["label", str(root), "-m", str(tiny_model_dir), "-o", str(out), "--workers", "0", "--progress", "none"]
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), f"duplicated display paths: {sorted(paths)}"
    assert len(rows) == len(written), f"{len(rows)} rows for {len(written)} files"
    for row in rows:
        assert "\n" not in row["path"]
        back = os.fsencode(fs_path(root, row["path"]))
        assert back in written, f"{row['path']!r} does not map back to one of the files"
    assert {os.fsencode(fs_path(root, p)) for p in paths} == set(written)
    json.dumps(rows)  # every row is valid JSON text
