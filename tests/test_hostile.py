"""Hostile inputs: the generated corpus (tests/corpus/generate.py) through the decode path, through the real service
(one TorchServe start for the module) mixed with good images in the same request, a 1,000-image request, odd
requests, a property-based fuzz of `serving.core.preprocess`, and hostile file names for the labeller.

The promise checked: every item gets a clear per-item error (a known code) or the correct result (the one the
in-process engine gives for the same bytes), its neighbours in the same request still succeed, and the worker's
memory stays bounded (the 400 Mpx PNG and the bomb are refused from their header, never decoded).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from conftest import REPO_ROOT, predictions_url, running_service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.core.preprocess import DecodeLimits, ImageError, load_image

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


# -------------------------------------------------------------------------------------------- the real service
@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    """The service on the tiny contract model: the decode path is the same for every model, and it keeps the
    module fast (the soak benchmark uses the default model)."""
    with running_service(
        tmp_path_factory,
        model=str(tiny_model_dir),
        batch_size=8,
        max_batch_delay_ms=20,
        intra_op_threads=1,
    ) as host:
        yield host


@pytest.fixture(scope="module")
def url(service):
    return predictions_url(service)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from serving.core.engine import Engine

    return Engine(tiny_model_dir / "model.onnx", providers=("cpu",), intra_op_threads=1, max_batch=64)


@pytest.fixture(scope="module")
def good_images(cifar_test_dir) -> list[bytes]:
    classes = sorted(p.name for p in cifar_test_dir.iterdir() if p.is_dir())
    return [p.read_bytes() for c in classes for p in sorted((cifar_test_dir / c).glob("*.jpg"))[:3]]


def _worker_rss(service) -> int:
    jvm = psutil.Process(service.process.pid)
    workers = [p for p in jvm.children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())]
    assert workers, "no TorchServe Python worker found under the JVM"
    return sum(p.memory_info().rss for p in workers)


def _expected(engine, data: bytes) -> dict | None:
    try:
        array = load_image(data, engine.input_size)
    except ImageError:
        return None
    return engine.predict(array[None])[0].public()


def _check_item(item: dict, entry: dict | None, expected: dict | None) -> None:
    name = entry["name"] if entry else "good image"
    if "error" in item:
        assert item["error"]["code"] in KNOWN_CODES and item["error"]["message"], (name, item)
        assert entry is not None and item["error"]["code"] in _allowed(entry), (name, item)
        assert expected is None, f"{name}: the service refused an image the engine accepts"
    else:
        assert entry is None or "ok" in _allowed(entry), (name, item)
        assert expected is not None, f"{name}: the service accepted an image the engine refuses"
        assert item["cluster"] == expected["cluster"], name
        assert item["confidence"] == pytest.approx(expected["confidence"], rel=1e-4), name


def _multipart(parts: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """(field name, data, part content type) → body, content type (our own builder: odd part types on purpose)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, data, kind in parts:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def test_corpus_in_one_multipart_request_with_good_neighbours(service, url, corpus, engine, good_images):
    """Every corpus file as one part, a real JPEG between each two: one answer per part, in order."""
    directory, manifest = corpus
    rss_before = _worker_rss(service)
    parts, entries = [], []
    for n, entry in enumerate(manifest):
        parts.append((f"c{n:03d}", (directory / entry["name"]).read_bytes(), "application/octet-stream"))
        entries.append(entry)
        parts.append((f"g{n:03d}", good_images[n % len(good_images)], "image/jpeg"))
        entries.append(None)
    body, content_type = _multipart(parts)
    for _ in range(3):  # three times: memory must not grow with repetition
        response = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=120)
        assert response.status_code == 200, response.text[:500]
        answers = response.json()
        assert len(answers) == len(parts)
        for (_, data, _), entry, item in zip(parts, entries, answers, strict=True):
            _check_item(item, entry, _expected(engine, data))
    growth = _worker_rss(service) - rss_before
    print(f"\nworker RSS {rss_before / 2**20:.0f} MiB -> {(rss_before + growth) / 2**20:.0f} MiB after 3 x corpus")
    assert growth < WORKER_RSS_GROWTH_LIMIT, f"worker RSS grew by {growth / 2**20:.0f} MiB"


def test_corpus_as_json_base64_with_a_string_that_is_not_base64(service, url, corpus, engine, good_images):
    directory, manifest = corpus
    datas = [(directory / e["name"]).read_bytes() for e in manifest]
    images = [base64.b64encode(d).decode() for d in datas]
    broken = ["%%% not base64 %%%", "QUJ", "data:image/png;base64,@@@@", "ÿÿÿÿ"]
    payload = {"images": images + broken + [base64.b64encode(good_images[0]).decode(), 42, None]}
    response = requests.post(url, json=payload, timeout=120)
    assert response.status_code == 200, response.text[:500]
    answers = response.json()
    assert len(answers) == len(payload["images"])
    for data, entry, item in zip(datas, manifest, answers, strict=False):
        _check_item(item, entry, _expected(engine, data))
    tail = answers[len(images) :]
    assert [t["error"]["code"] for t in tail[:4]] == ["bad_request"] * 4
    assert "base64" in tail[0]["error"]["message"]
    _check_item(tail[4], None, _expected(engine, good_images[0]))
    assert [t["error"]["code"] for t in tail[5:]] == ["bad_request", "bad_request"]


def test_a_thousand_images_in_one_request_answer_in_order(service, url, engine, good_images):
    """1,000 images (every 97th broken) in one JSON request: 1,000 results in request order, each equal to the
    in-process engine's. (≈ 2 MB: far below `max_request_bytes`, 100 MiB by default; above it the front answers
    413 — see tests/test_service.py.)"""
    datas = [good_images[(i * 7) % len(good_images)] if i % 97 else b"not an image %d" % i for i in range(1000)]
    response = requests.post(url, json={"images": [base64.b64encode(d).decode() for d in datas]}, timeout=300)
    assert response.status_code == 200, response.text[:500]
    answers = response.json()
    assert len(answers) == 1000
    expected = {d: _expected(engine, d) for d in set(datas)}
    for i, (data, item) in enumerate(zip(datas, answers, strict=True)):
        if i % 97 == 0:
            assert item["error"]["code"] == "unsupported_format", (i, item)
        else:
            assert item["cluster"] == expected[data]["cluster"], i
            assert item["confidence"] == pytest.approx(expected[data]["confidence"], rel=1e-4), i


def test_a_thousand_part_multipart_request(service, url, engine, good_images):
    datas = [good_images[(i * 3) % len(good_images)] for i in range(1000)]
    body, content_type = _multipart([(f"f{i:04d}", d, "image/jpeg") for i, d in enumerate(datas)])
    response = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=300)
    assert response.status_code == 200, response.text[:300]
    answers = response.json()
    assert len(answers) == 1000
    clusters = {d: _expected(engine, d)["cluster"] for d in set(datas)}
    assert [a["cluster"] for a in answers] == [clusters[d] for d in datas]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("image/png", 200),  # a JPEG declared as PNG: the bytes decide
        ("application/x-www-form-urlencoded", 200),  # what plain curl sends: the front rewrites it
        (None, 200),
        ("application/json", 400),  # image bytes declared as JSON
        ("text/plain", 200),  # a mislabelled image: the bytes decide
        ("multipart/form-data; boundary=nothere", 400),
    ],
)
def test_wrong_content_type_gets_a_clear_answer(service, url, good_images, engine, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    session_request = requests.Request("POST", url, data=good_images[1], headers=headers).prepare()
    if content_type is None:
        session_request.headers.pop("Content-Type", None)
    with requests.Session() as session:
        response = session.send(session_request, timeout=60)
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert isinstance(body, list) and len(body) == 1
    if status == 200:
        _check_item(body[0], None, _expected(engine, good_images[1]))
    else:
        assert body[0]["error"]["code"] == "bad_request" and body[0]["error"]["message"]


def test_a_text_part_among_image_parts_is_a_per_item_error(service, url, good_images, engine):
    body, content_type = _multipart(
        [("a", good_images[0], "image/jpeg"), ("b", b"hello", "text/plain"), ("c", good_images[1], "image/jpeg")]
    )
    answers = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=60).json()
    assert len(answers) == 3
    _check_item(answers[0], None, _expected(engine, good_images[0]))
    assert answers[1]["error"]["code"] in {"bad_request", "unsupported_format"}
    _check_item(answers[2], None, _expected(engine, good_images[1]))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"--b--\r\n",
        b"--b\r\n\r\n--b--\r\n",
        b'--b\r\nContent-Disposition: form-data; filename="x"\r\n\r\nabc\r\n--b--',
    ],
    ids=["no-body", "closing-boundary-only", "one-empty-part-without-name", "a-part-without-a-name"],
)
def test_empty_multipart_is_a_clear_400(service, url, good_images, body):
    response = requests.post(url, data=body, headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
    assert response.status_code == 400, response.text[:300]
    answer = response.json()
    assert answer[0]["error"]["code"] == "bad_request" and answer[0]["error"]["message"]
    assert requests.post(url, data=good_images[0], timeout=60).status_code == 200  # still serving


def test_an_empty_raw_body_and_an_empty_file_part(service, url, good_images):
    response = requests.post(url, data=b"", headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200 and response.json() == [
        {"error": {"code": "empty", "message": "the image is empty (0 bytes)"}}
    ]
    body, content_type = _multipart([("a", b"", "image/jpeg"), ("b", good_images[0], "image/jpeg")])
    answers = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=60).json()
    assert answers[0]["error"]["code"] == "empty" and "cluster" in answers[1]


def test_a_poisoned_request_does_not_fail_its_batch_neighbours(service, url, good_images, engine):
    """`top_k: 1e999` (JSON infinity) sent alongside good requests that TorchServe batches with it: it gets its own
    400, the others their results (before the fix, the OverflowError failed the whole server-side batch)."""
    import concurrent.futures

    encoded = base64.b64encode(good_images[2]).decode()
    poison = b'{"images": ["' + encoded.encode() + b'"], "top_k": 1e999}'

    def send(i):
        if i % 4 == 0:
            return i, requests.post(url, data=poison, headers={"Content-Type": "application/json"}, timeout=60)
        return i, requests.post(url, data=good_images[i], timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(16)))
    for i, response in answers:
        if i % 4 == 0:
            assert response.status_code == 400, response.text[:300]
            assert "top_k" in response.json()[0]["error"]["message"]
        else:
            assert response.status_code == 200, response.text[:300]
            _check_item(response.json()[0], None, _expected(engine, good_images[i]))


# ------------------------------------------------------------------------------------- hostile names: labeller
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
