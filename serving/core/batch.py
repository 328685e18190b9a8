"""Run the engine over many files: walk, shard, decode in worker processes, batch, infer — shared by the
labeller (`deepclust label`) and the evaluation job.

Why this shape:
- **Deterministic walk.** Directories are listed one at a time and sorted by the raw bytes of each name, so two runs
  (and two machines) see the same order whatever the locale; only that directory's listing is in memory. Hidden
  directories *and* hidden files (`.git`, macOS `._x.jpg` resource forks) are skipped; symlinked files are followed,
  symlinked directories are not (no cycles). Names that are not UTF-8 survive: paths are `str` with
  `surrogateescape` (what `os` gives back), turned into a printable `display_path` only for output.
- **Stable sharding.** A file belongs to shard `blake2b(relative path) mod N`: disjoint and covering by
  construction, and stable when files are added or removed (a position-based split would move every later file).
- **Decode in processes, infer in the main process.** Pillow holds the GIL for part of a decode, so decoding runs
  in `workers` spawned processes (spawn, not fork: the parent already runs onnxruntime threads). Work is submitted
  in chunks and at most `max_in_flight` chunks are outstanding, so memory is bounded whatever the folder size while
  the workers decode ahead of the engine. Results come back in walk order.
- **Errors are values.** A file that cannot be read or decoded yields a `BatchItem` with an `ItemError`; nothing
  raises out of `run_files` for a bad file (a failing engine is a real fault and does raise).
- **Content hash.** sha256 of the file's bytes (the same digest `sha256sum` prints), computed while the bytes are in
  memory. A caller that passes the previous hash of a path gets `unchanged=True` back without a decode or an
  inference: that is how re-runs skip unchanged files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import stat
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.core.preprocess import DecodeLimits, ImageError, load_image
from serving.core.results import Assignment, ItemError

if TYPE_CHECKING:  # the engine pulls in onnxruntime; workers never need it
    from serving.core.engine import Engine

log = logging.getLogger("deepclust.batch")

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".ico",
        ".tga",
    }
)


# ---------------------------------------------------------------------------------------------------- walk
def is_image_name(name: str) -> bool:
    """True for the common image extensions, case-insensitively (`IMG_001.JPG` counts)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(root: str | Path) -> Iterator[str]:
    """Relative paths (with `/`) of the image files under `root`, in a deterministic sorted order.

    Unreadable directories are logged and skipped (their files cannot be labelled, and one of them must not stop
    a run over a million others)."""
    root_str = os.fspath(root)
    yield from _walk(root_str, "")


def _walk(root: str, prefix: str) -> Iterator[str]:
    directory = os.path.join(root, prefix) if prefix else root
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError as exc:
        log.warning("skipping unreadable directory %r: %s", display_path(prefix or "."), exc)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        rel = f"{prefix}/{entry.name}" if prefix else entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(root, rel)
            elif is_image_name(entry.name) and entry.is_file(follow_symlinks=True):
                yield rel
        except OSError as exc:  # a vanished entry or a too-long path: skip it, never stop the walk
            log.warning("skipping %r: %s", display_path(rel), exc)


def display_path(rel: str) -> str:
    """A printable, valid-UTF-8 form of a relative path, used in every output row.

    UTF-8 names are unchanged; bytes that are not UTF-8 become `\\xNN` and control characters (a newline is legal in
    a file name) become `\\xNN` too, so that a row is always one line of text. `fs_path` reverses it."""
    if rel.isprintable() and "\\x" not in rel:  # the common case: valid UTF-8, no control characters, no surrogates
        return rel
    # A literal backslash is escaped too (as \\x5c): otherwise a file literally named `x\\xff.jpg` and one named
    # `x<byte 0xff>.jpg` would get the same display path, and one of them would lose its row.
    text = os.fsencode(rel).replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")
    return "".join(f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text)


def fs_path(root: str | Path, display: str) -> str:
    """The file system path for a `display_path`: `\\xNN` escapes undone (a literal name only as a fallback)."""
    literal = os.path.join(os.fspath(root), display)
    if "\\x" not in display:
        return literal
    out = bytearray()
    i, data = 0, display
    while i < len(data):
        if data.startswith("\\x", i) and i + 4 <= len(data):
            try:
                out.append(int(data[i + 2 : i + 4], 16))
                i += 4
                continue
            except ValueError:
                pass
        out += data[i].encode("utf-8")
        i += 1
    unescaped = os.path.join(os.fspath(root), os.fsdecode(bytes(out)))
    # rows written before literal backslashes were escaped may name a file literally: keep finding it
    return literal if not os.path.lexists(unescaped) and os.path.lexists(literal) else unescaped


# -------------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): a file is in it iff `blake2b(path) mod count == index`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"bad shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"I/N"` → `Shard(I, N)`; raises `ValueError` with a readable message."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError as exc:
            raise ValueError(f"bad shard {text!r}: expected I/N, e.g. 0/4") from exc
        return cls(index, count)

    def owns(self, rel: str) -> bool:
        if self.count == 1:
            return True
        digest = hashlib.blake2b(os.fsencode(rel), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_paths(paths: Iterable[str], shard: Shard) -> Iterator[str]:
    return (p for p in paths if shard.owns(p))


# --------------------------------------------------------------------------------------------------- items
@dataclass
class BatchItem:
    """One file's outcome. `result` is an `Assignment` or an `ItemError`; `unchanged` means the caller's previous
    hash matched, so nothing was decoded or inferred (`result` is then `None`)."""

    path: str  # display path (printable, UTF-8)
    sha256: str | None
    result: Assignment | ItemError | None
    unchanged: bool = False
    probabilities: np.ndarray | None = None
    embedding: np.ndarray | None = None
    rel: str = field(default="", repr=False)  # the file system relative path (may hold surrogates)

    @property
    def ok(self) -> bool:
        return isinstance(self.result, Assignment)


@dataclass(frozen=True)
class _Decoded:
    rel: str
    sha256: str | None
    pixels: np.ndarray | None
    error: tuple[str, str] | None
    unchanged: bool


def _decode_one(root: str, rel: str, previous: str | None, size: int, limits: DecodeLimits) -> _Decoded:
    path = os.path.join(root, rel)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return _Decoded(rel, None, None, ("bad_request", "not a regular file"), False)
        if st.st_size > limits.max_bytes:
            # Never read a huge file into memory just to refuse it; its hash stays unknown.
            if previous == _TOO_LARGE_MARK:
                return _Decoded(rel, None, None, None, True)
            return _Decoded(
                rel,
                None,
                None,
                ("too_large", f"the file has {st.st_size} bytes; the limit is {limits.max_bytes}"),
                False,
            )
        with open(path, "rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    except OSError as exc:
        return _Decoded(rel, None, None, ("decode_error", f"the file could not be read: {exc.strerror or exc}"), False)
    digest = hashlib.sha256(data).hexdigest()
    if previous is not None and previous == digest:
        return _Decoded(rel, digest, None, None, True)
    try:
        pixels = load_image(data, size, limits)
    except ImageError as exc:
        return _Decoded(rel, digest, None, (exc.code, exc.message), False)
    except Exception as exc:  # a codec bug is still one bad file, not a failed run
        return _Decoded(rel, digest, None, ("decode_error", f"{type(exc).__name__}: {exc}"), False)
    return _Decoded(rel, digest, pixels, None, False)


_TOO_LARGE_MARK = "too_large"  # the "previous hash" of a file refused for its size (it was never hashed)


def _decode_chunk(
    root: str, chunk: Sequence[tuple[str, str | None]], size: int, limits: DecodeLimits
) -> list[_Decoded]:
    return [_decode_one(root, rel, previous, size, limits) for rel, previous in chunk]


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the labeller dies (e.g. `kill -9`). A pool worker holds both ends of its task
    queue, so it would otherwise wait for work forever as an orphan."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _worker_init(nice: int) -> None:
    """Decode workers run at a lower priority than the engine: when the cores are busy, onnxruntime's threads keep
    them (a preempted thread stalls the whole parallel operator), and decoding fills the gaps. The engine still
    gets its images because it blocks (idles the cores) whenever the decoded queue runs dry."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    _die_with_parent()
    if nice > 0:
        with contextlib.suppress(OSError):  # not permitted: run at the normal priority
            os.nice(nice)


# ------------------------------------------------------------------------------------------------ pipeline
@dataclass(frozen=True)
class PipelineOptions:
    batch_size: int = 64
    workers: int = 1  # 0 = decode inline in the calling process (debugging, tiny folders)
    chunk_size: int = 32  # files per worker task: big enough to amortise IPC, small enough to keep order cheap
    max_in_flight: int = 0  # outstanding chunks; 0 = 4 per worker (min 2)
    top_k: int = 0
    with_probabilities: bool = False
    with_embedding: bool = False
    limits: DecodeLimits = DecodeLimits()
    worker_nice: int = 10  # see _worker_init; 0 = same priority as the engine

    def in_flight(self) -> int:
        return self.max_in_flight or max(2, 4 * max(self.workers, 1))


def run_files(
    engine: Engine,
    root: str | Path,
    paths: Iterable[str | tuple[str, str | None]],
    options: PipelineOptions = PipelineOptions(),
) -> Iterator[BatchItem]:
    """Label the files `paths` (relative to `root`, or `(rel, previous_sha256)` pairs) and yield one `BatchItem`
    per file, in the order given. Decoding overlaps inference; memory is bounded by `options.in_flight()` chunks
    plus one batch."""
    root_str = os.fspath(root)
    size = int(engine.input_size)
    class_names = engine.metadata.class_names
    pending: deque[_Decoded] = deque()  # decoded, in order, not yet yielded
    n_good = 0

    def flush() -> Iterator[BatchItem]:
        nonlocal n_good
        good = [d for d in pending if d.pixels is not None]
        outputs: list[tuple[Assignment, np.ndarray | None, np.ndarray | None]] = []
        if good:
            outputs = _infer(engine, np.stack([d.pixels for d in good]), class_names, options)
        it = iter(outputs)
        while pending:
            item = pending.popleft()
            if item.pixels is not None:
                assignment, probs, embed = next(it)
                yield BatchItem(display_path(item.rel), item.sha256, assignment, False, probs, embed, item.rel)
            elif item.unchanged:
                yield BatchItem(display_path(item.rel), item.sha256, None, True, rel=item.rel)
            else:
                code, message = item.error or ("decode_error", "unknown")
                yield BatchItem(display_path(item.rel), item.sha256, ItemError.of(code, message), rel=item.rel)
        n_good = 0

    for decoded in _decoded_stream(root_str, paths, size, options):
        pending.append(decoded)
        if decoded.pixels is not None:
            n_good += 1
        # A full batch runs; so does a long run of skipped/bad files (bounded memory when few files are new).
        if n_good >= options.batch_size or len(pending) >= 4 * options.batch_size:
            yield from flush()
    yield from flush()


def _infer(
    engine: Engine, images: np.ndarray, class_names: list[str] | None, options: PipelineOptions
) -> list[tuple[Assignment, np.ndarray | None, np.ndarray | None]]:
    from serving.core.engine import assign

    output = engine.run(images)
    assignments = assign(output, class_names, top_k=options.top_k)
    rows = []
    for i, assignment in enumerate(assignments):
        probs = np.asarray(output.probabilities[i]) if options.with_probabilities else None
        embed = np.asarray(output.embedding[i]) if options.with_embedding else None
        rows.append((assignment, probs, embed))
    return rows


def _normalise(entry: str | tuple[str, str | None]) -> tuple[str, str | None]:
    return (entry, None) if isinstance(entry, str) else (entry[0], entry[1])


def _chunks(paths: Iterable[str | tuple[str, str | None]], size: int) -> Iterator[list[tuple[str, str | None]]]:
    chunk: list[tuple[str, str | None]] = []
    for entry in paths:
        chunk.append(_normalise(entry))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decoded_stream(
    root: str, paths: Iterable[str | tuple[str, str | None]], size: int, options: PipelineOptions
) -> Iterator[_Decoded]:
    chunks = _chunks(paths, options.chunk_size)
    if options.workers <= 0:
        for chunk in chunks:
            yield from _decode_chunk(root, chunk, size, options.limits)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=options.workers, mp_context=context, initializer=_worker_init, initargs=(options.worker_nice,)
    )
    in_flight: deque[Future[list[_Decoded]]] = deque()
    try:
        for chunk in chunks:
            in_flight.append(pool.submit(_decode_chunk, root, chunk, size, options.limits))
            if len(in_flight) >= options.in_flight():
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()
    finally:
        for future in in_flight:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
