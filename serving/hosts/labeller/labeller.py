"""`deepclust label`: one row per image of a folder, resumable after `kill -9` at any moment.

How "no row lost, none duplicated" is kept (the design, in one place):
- The rows file (csv or jsonl) and the errors file (jsonl) are **append-only**, one row per line (paths are printed
  with `batch.display_path`, which never contains a newline). Rows are flushed to the OS after every batch and
  `fsync`ed every `fsync_seconds` together with the progress marker `<output>.progress.json` (written atomically:
  temp file + `os.replace`). `kill -9` does not lose what the OS has; a power cut loses at most the last seconds.
- On start, each file is **read back**: complete lines are parsed and validated; the first torn or invalid line
  (a write cut by the kill) and everything after it is truncated away. The paths read back are the state.
- The walk then visits every file of the shard; a path already in the state with the same sha256 is skipped
  without a decode (re-runs skip unchanged files by content). Anything else is labelled and appended.
- A path that gets a new row (the file changed, or moved between rows and errors) or that vanished from the folder
  leaves a stale row behind; at the end of a *complete* run the files are compacted (rewritten to a temp file and
  renamed over, so a kill during compaction loses nothing either).
- **parquet** cannot be appended to safely, so `-o x.parquet` journals rows to `x.parquet.journal.jsonl` (the same
  append-only machinery) and writes `x.parquet` from it at the end of every complete run (temp + rename). Keep the
  journal: it is what a re-run resumes from (if it was deleted, it is rebuilt from the parquet file).
- The marker holds a fingerprint (model sha256, shard, top-k, format, folder): a re-run with different arguments
  refuses (exit 2) instead of mixing two models' rows in one file; `--overwrite` starts afresh. An exclusive
  `flock` on `<output>.lock` keeps two runs from writing the same output at once.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.core.batch import (
    _TOO_LARGE_MARK,
    BatchItem,
    PipelineOptions,
    Shard,
    display_path,
    walk_images,
)
from serving.core.contract import Variant
from serving.core.model_store import ModelStoreError, resolve_model
from serving.core.preprocess import DecodeLimits
from serving.core.results import Assignment, ItemError

log = logging.getLogger("deepclust.label")

FORMATS = ("csv", "jsonl", "parquet")
MARKER_VERSION = 1


class UsageError(ValueError):
    """Bad arguments or a bad environment: the CLI prints the message and exits with code 2."""


# ------------------------------------------------------------------------------------------------- config
class LabelConfig(BaseModel):
    """Everything one `deepclust label` run needs, validated at the edge."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    root: Path
    model: Path
    output: Path
    errors: Path | None = None
    top_k: int = Field(0, ge=0)
    shard: Shard = Shard()
    workers: int = Field(1, ge=0, le=64)
    batch_size: int = Field(16, ge=1, le=4096)  # as fast as 64 on CPU here, a third of the RSS
    threads: int = Field(0, ge=0, le=256)
    variant: Variant = "fp32"
    gallery: Path | None = None
    overwrite: bool = False
    max_bytes: int = Field(DecodeLimits().max_bytes, gt=0)
    max_pixels: int = Field(DecodeLimits().max_pixels, gt=0)
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    fsync_seconds: float = Field(2.0, gt=0)
    gallery_examples: int = Field(8, ge=1, le=64)
    worker_nice: int = Field(10, ge=0, le=19)

    @field_validator("output")
    @classmethod
    def _known_format(cls, value: Path) -> Path:
        if output_format(value) not in FORMATS:
            raise ValueError(f"output must end in .csv, .jsonl or .parquet, got {value.name!r}")
        return value

    def resolved_errors(self) -> Path:
        """`--errors`, or `<output stem>.errors.jsonl` beside the output (errors are always kept: resume needs them)."""
        if self.errors is not None:
            return self.errors
        return self.output.with_name(f"{self.output.stem}.errors.jsonl")


def output_format(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


# ----------------------------------------------------------------------------------------------- row codecs
class Codec:
    """One row ↔ one line of text. `decode` raises on anything that is not a complete, valid row."""

    header: str | None = None

    def encode(self, row: dict[str, Any]) -> str:
        raise NotImplementedError

    def decode(self, line: str) -> dict[str, Any]:
        raise NotImplementedError


class JsonlCodec(Codec):
    def __init__(self, required: tuple[str, ...]) -> None:
        self.required = required

    def encode(self, row: dict[str, Any]) -> str:
        return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"

    def decode(self, line: str) -> dict[str, Any]:
        row = json.loads(line)
        if not isinstance(row, dict) or any(k not in row for k in self.required):
            raise ValueError("incomplete row")
        return row


class CsvCodec(Codec):
    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.header = ",".join(columns) + "\n"

    def encode(self, row: dict[str, Any]) -> str:
        buffer = io.StringIO()
        values = []
        for column in self.columns:
            value = row.get(column)
            if column == "top_k":
                value = json.dumps(value, separators=(",", ":"))
            values.append("" if value is None else value)
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue()

    def decode(self, line: str) -> dict[str, Any]:
        values = next(csv.reader([line]))
        if len(values) != len(self.columns):
            raise ValueError("wrong number of fields")
        row: dict[str, Any] = dict(zip(self.columns, values, strict=True))
        row["cluster"] = int(row["cluster"])
        row["confidence"] = float(row["confidence"])
        row["label"] = row["label"] or None
        if "top_k" in row:
            row["top_k"] = json.loads(row["top_k"])
        if len(row["sha256"]) != 64:
            raise ValueError("bad sha256")
        return row


def row_columns(top_k: int) -> list[str]:
    columns = ["path", "cluster", "confidence", "label"]
    if top_k:
        columns.append("top_k")
    return columns + ["sha256"]


# ------------------------------------------------------------------------------------------ append-only log
class AppendLog:
    """An append-only file of one-line rows that survives being cut at any byte."""

    def __init__(self, path: Path, codec: Codec) -> None:
        self.path = path
        self.codec = codec
        self._fh: io.TextIOWrapper | None = None
        self.appended = 0  # rows appended by this process
        self.lines = 0  # rows in the file (recovered + appended): the next row's line index

    def recover(self, truncate: bool = True) -> Iterator[dict[str, Any]]:
        """Yield the valid rows on disk; with `truncate`, cut the file at the first torn/invalid line (a write
        interrupted by a kill) so that appending continues from a clean line boundary."""
        self.lines = 0
        if not self.path.exists():
            return
        good_end = 0
        bad = "torn header"
        with open(self.path, "rb") as fh:
            header_ok = True
            if self.codec.header is not None:
                first = fh.readline()
                if first == self.codec.header.encode():
                    good_end = len(first)
                elif first.endswith(b"\n"):
                    raise UsageError(
                        f"{self.path} has another header ({first[:200]!r}); use --overwrite to start afresh"
                    )
                else:
                    header_ok = False  # cut inside the header: start the file again
            if header_ok:
                for raw in iter(fh.readline, b""):
                    if not raw.endswith(b"\n"):
                        bad = "torn last line"
                        break
                    try:
                        row = self.codec.decode(raw.decode("utf-8"))
                    except Exception as exc:
                        bad = f"invalid line ({exc})"
                        break
                    good_end += len(raw)
                    self.lines += 1
                    yield row
        size = self.path.stat().st_size
        if truncate and size != good_end:
            log.warning(
                "truncating %s from %d to %d bytes (%s: the end of an interrupted write)",
                self.path,
                size,
                good_end,
                bad,
            )
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                os.fsync(fh.fileno())

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
        if self.codec.header is not None and self._fh.tell() == 0:
            self._fh.write(self.codec.header)

    def append(self, row: dict[str, Any]) -> None:
        assert self._fh is not None
        self._fh.write(self.codec.encode(row))
        self.appended += 1
        self.lines += 1

    def flush(self, fsync: bool = False) -> None:
        if self._fh is not None:
            self._fh.flush()
            if fsync:
                os.fsync(self._fh.fileno())

    def fsync(self) -> None:
        """Called from the syncer thread: fsync whatever the OS has (the main thread flushes)."""
        fh = self._fh
        if fh is not None:
            with contextlib.suppress(ValueError):  # closed meanwhile
                os.fsync(fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.flush(fsync=True)
            self._fh.close()
            self._fh = None

    def compact(self, keep: Callable[[int, dict[str, Any]], bool]) -> int:
        """Rewrite the file keeping rows for which `keep(line_index, row)` holds (temp + rename); returns dropped."""
        tmp = self.path.with_name(self.path.name + ".compact.tmp")
        dropped = 0
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            if self.codec.header is not None:
                out.write(self.codec.header)
            for index, row in enumerate(self.recover()):
                if keep(index, row):
                    out.write(self.codec.encode(row))
                else:
                    dropped += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        return dropped


class _Syncer:
    """fsync of the logs + the progress marker on a background thread: an fsync costs ~20 ms here, which on the
    inference thread would be a few per cent of throughput. At most one request waits; extra ones are dropped."""

    def __init__(self, logs: list[AppendLog], marker_path: Path) -> None:
        self._logs = logs
        self._marker_path = marker_path
        self._jobs: queue.Queue[str | None] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._loop, name="label-fsync", daemon=True)
        self._thread.start()

    def request(self, marker_text: str) -> None:
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(marker_text)

    def _loop(self) -> None:
        while (marker_text := self._jobs.get()) is not None:
            try:
                for store in self._logs:
                    store.fsync()
                _write_atomic(self._marker_path, marker_text)  # only after the rows it counts are on disk
            except OSError as exc:
                log.warning("background fsync failed: %s", exc)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- state
@dataclass
class Entry:
    """What the output files say about one path: which file, its line index there, and the outcome."""

    kind: Literal["row", "error"]
    index: int
    sha256: str | None
    cluster: int | None = None
    code: str | None = None


@dataclass
class LabelSummary:
    images: int = 0  # files of the shard seen by this run
    labelled: int = 0  # newly labelled by this run
    skipped_unchanged: int = 0
    new_errors: int = 0
    errors: int = 0  # error rows for current files (new or carried over)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    clusters: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    compacted_rows: int = 0
    output: str = ""
    errors_file: str = ""
    gallery: str | None = None
    shard: str = "0/1"

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0


# ------------------------------------------------------------------------------------------------- progress
class Progress:
    """tqdm bar on a terminal (images/s, ETA), structured log lines every few seconds otherwise."""

    def __init__(self, total: int, mode: str, interval: float = 5.0) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.last_log = self.started
        self.interval = interval
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self.last_log >= self.interval:
                self.last_log = now
                elapsed = now - self.started
                rate = self.done / elapsed if elapsed > 0 else 0.0
                eta = (self.total - self.done) / rate if rate > 0 else None
                _event(
                    "progress",
                    done=self.done,
                    total=self.total,
                    images_per_s=round(rate, 1),
                    eta_s=None if eta is None else round(eta, 1),
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _event(event: str, **fields: Any) -> None:
    """One structured log line (JSON) on stderr."""
    log.info(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str))


# ------------------------------------------------------------------------------------------------- the run
class Labeller:
    """One `deepclust label` run. Use `run()`; raises `UsageError` for bad usage (exit 2)."""

    def __init__(self, config: LabelConfig) -> None:
        self.config = config
        self.format = output_format(config.output)
        if not config.root.is_dir():
            raise UsageError(f"not a directory: {config.root}")
        try:  # the model store's one resolver: variant file, card, sha256 (same rules as `deepclust serve`)
            self.model_file = resolve_model(config.model, config.variant).file
        except ModelStoreError as exc:
            raise UsageError(str(exc)) from exc
        self.columns = row_columns(config.top_k)
        rows_path = (
            config.output.with_name(config.output.name + ".journal.jsonl")
            if self.format == "parquet"
            else config.output
        )
        row_codec: Codec = CsvCodec(self.columns) if self.format == "csv" else JsonlCodec(("path", "cluster"))
        self.rows = AppendLog(rows_path, row_codec)
        self.errors = AppendLog(config.resolved_errors(), JsonlCodec(("path", "code")))
        if self.errors.path.resolve() == self.rows.path.resolve():
            raise UsageError("the errors file must differ from the output file")
        self.marker_path = config.output.with_name(config.output.name + ".progress.json")
        self.lock_path = config.output.with_name(config.output.name + ".lock")
        self.state: dict[str, Entry] = {}
        self.stale = 0  # rows on disk that a newer row (or a vanished file) made obsolete

    # --------------------------------------------------------------------------------------------- resume
    def fingerprint(self, model_sha256: str) -> dict[str, Any]:
        c = self.config
        return {
            "model_sha256": model_sha256,
            "shard": str(c.shard),
            "top_k": c.top_k,
            "format": self.format,
            "columns": self.columns,
            "root": str(c.root.resolve()),
        }

    def _check_marker(self, fingerprint: dict[str, Any]) -> None:
        if self.config.overwrite:
            for path in (self.rows.path, self.errors.path, self.marker_path, self.config.output):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return
        if self.marker_path.exists():
            try:
                previous = json.loads(self.marker_path.read_text()).get("fingerprint")
            except (OSError, json.JSONDecodeError):
                previous = None
            if previous is not None and previous != fingerprint:
                changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
                raise UsageError(
                    f"{self.config.output} was written by a run with other arguments (differs in: "
                    f"{', '.join(changed)}); re-run with the same arguments to resume, or pass --overwrite"
                )
        elif self.rows.path.exists() and self.rows.path.stat().st_size > 0:
            raise UsageError(
                f"{self.rows.path} exists but has no progress marker ({self.marker_path.name}); it was not "
                f"written by `deepclust label` — pass --overwrite to replace it"
            )

    def _seed_journal_from_parquet(self) -> None:
        """The parquet journal was deleted but the parquet file exists: rebuild the journal from it."""
        if self.format != "parquet" or self.rows.path.exists() or not self.config.output.exists():
            return
        import pyarrow.parquet as pq

        self.rows.open()
        for batch in pq.ParquetFile(self.config.output).iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                self.rows.append(row)
        self.rows.close()

    def _load_state(self) -> None:
        for kind, store in (("row", self.rows), ("error", self.errors)):
            for index, row in enumerate(store.recover()):
                path = row["path"]
                entry = Entry(kind, index, row.get("sha256"), row.get("cluster"), row.get("code"))  # type: ignore[arg-type]
                previous = self.state.get(path)
                if previous is not None:
                    self.stale += 1
                    if previous.kind != kind:
                        entry.sha256 = None  # in both files: order unknown, so label it again
                self.state[path] = entry

    def _previous_hash(self, display: str) -> str | None:
        entry = self.state.get(display)
        if entry is None:
            return None
        if entry.sha256 is None and entry.code == "too_large":
            return _TOO_LARGE_MARK
        return entry.sha256

    def _marker_text(self, fingerprint: dict[str, Any], summary: LabelSummary, complete: bool) -> str:
        marker = {
            "version": MARKER_VERSION,
            "fingerprint": fingerprint,
            "complete": complete,
            "rows_appended": self.rows.appended,
            "errors_appended": self.errors.appended,
            "labelled": summary.labelled,
            "skipped_unchanged": summary.skipped_unchanged,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return json.dumps(marker, indent=2) + "\n"

    def _write_marker(self, fingerprint: dict[str, Any], summary: LabelSummary, complete: bool) -> None:
        _write_atomic(self.marker_path, self._marker_text(fingerprint, summary, complete))

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> LabelSummary:
        from serving.core.engine import Engine

        c = self.config
        c.output.parent.mkdir(parents=True, exist_ok=True)
        lock_fh = open(self.lock_path, "a")  # noqa: SIM115 - held for the whole run
        try:
            try:
                fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise UsageError(f"another `deepclust label` is writing {c.output} (lock {self.lock_path})") from exc
            engine = Engine(self.model_file, intra_op_threads=c.threads, max_batch=c.batch_size, spin=c.workers == 0)
            fingerprint = self.fingerprint(engine.sha256)
            self._check_marker(fingerprint)
            self._seed_journal_from_parquet()
            self._load_state()
            return self._run(engine, fingerprint)
        finally:
            lock_fh.close()

    def _shard_paths(self) -> Iterator[str]:
        return (rel for rel in walk_images(self.config.root) if self.config.shard.owns(rel))

    def _run(self, engine: Any, fingerprint: dict[str, Any]) -> LabelSummary:
        from serving.core.batch import run_files

        c = self.config
        summary = LabelSummary(shard=str(c.shard), output=str(c.output), errors_file=str(self.errors.path))
        total = sum(1 for _ in self._shard_paths())
        seen: set[str] = set()

        def feed() -> Iterator[tuple[str, str | None]]:
            for rel in self._shard_paths():
                display = display_path(rel)
                seen.add(display)
                yield rel, self._previous_hash(display)

        options = PipelineOptions(
            batch_size=c.batch_size,
            workers=c.workers,
            top_k=c.top_k,
            limits=DecodeLimits(max_bytes=c.max_bytes, max_pixels=c.max_pixels),
            worker_nice=c.worker_nice,
        )
        _event(
            "start",
            root=str(c.root),
            model=str(self.model_file),
            provider=engine.provider,
            output=str(c.output),
            shard=str(c.shard),
            files=total,
            already_done=len(self.state),
            workers=c.workers,
            batch_size=c.batch_size,
        )
        self._write_marker(fingerprint, summary, complete=False)
        self.rows.open()
        self.errors.open()
        progress = Progress(total, c.progress)
        syncer = _Syncer([self.rows, self.errors], self.marker_path)
        started = time.monotonic()
        last_sync = started
        since_flush = 0
        try:
            for item in run_files(engine, c.root, feed(), options):
                self._record(item, summary)
                progress.update()
                since_flush += 1
                if since_flush >= c.batch_size:
                    since_flush = 0
                    self.rows.flush()  # to the OS: enough to survive kill -9
                    self.errors.flush()
                    now = time.monotonic()
                    if now - last_sync >= c.fsync_seconds:  # to the disk, off the inference path
                        last_sync = now
                        syncer.request(self._marker_text(fingerprint, summary, complete=False))
        finally:
            progress.close()
            syncer.close()
            self.rows.close()
            self.errors.close()
        summary.seconds = time.monotonic() - started
        processed = summary.labelled + summary.new_errors
        summary.images_per_s = processed / summary.seconds if summary.seconds > 0 else 0.0
        summary.images = len(seen)
        summary.compacted_rows = self._finish(seen)
        self._summarise(summary, seen)
        if self.format == "parquet":
            write_parquet(self.rows.path, c.output, self.columns)
        self._write_marker(fingerprint, summary, complete=True)
        if c.gallery is not None:
            from serving.hosts.labeller.gallery import build_gallery

            build_gallery(
                rows=self.rows.recover(),
                root=c.root,
                output=c.gallery,
                model_name=c.model.name,
                class_names=engine.metadata.class_names,
                k=engine.k,
                examples=c.gallery_examples,
                errors=summary.errors,
            )
            summary.gallery = str(c.gallery)
        _event("summary", **summary_dict(summary))
        return summary

    def _record(self, item: BatchItem, summary: LabelSummary) -> None:
        if item.unchanged:
            summary.skipped_unchanged += 1
            return
        previous = self.state.get(item.path)
        if previous is not None:
            self.stale += 1
        if isinstance(item.result, Assignment):
            a = item.result
            row: dict[str, Any] = {
                "path": item.path,
                "cluster": a.cluster,
                "confidence": round(a.confidence, 6),
                "label": a.label,
            }
            if self.config.top_k:
                row["top_k"] = [
                    {"cluster": t.cluster, "probability": round(t.probability, 6), "label": t.label}
                    for t in a.top_k or []
                ]
            row["sha256"] = item.sha256
            self.state[item.path] = Entry("row", self.rows.lines, item.sha256, a.cluster)
            self.rows.append(row)
            summary.labelled += 1
        elif isinstance(item.result, ItemError):
            detail = item.result.error
            self.state[item.path] = Entry("error", self.errors.lines, item.sha256, code=detail.code)
            self.errors.append(
                {"path": item.path, "code": detail.code, "message": detail.message, "sha256": item.sha256}
            )
            summary.new_errors += 1

    def _finish(self, seen: set[str]) -> int:
        """Compact when stale rows exist (changed or vanished files); a kill here loses nothing (temp + rename)."""
        vanished = [p for p in self.state if p not in seen]
        for path in vanished:
            del self.state[path]
        if not (self.stale or vanished):
            return 0
        dropped = 0
        for kind, store in (("row", self.rows), ("error", self.errors)):

            def keep(index: int, row: dict[str, Any], kind: str = kind) -> bool:
                entry = self.state.get(row["path"])
                return entry is not None and entry.kind == kind and entry.index == index

            dropped += store.compact(keep)
        # line indices changed: reload so that the state matches the files again
        self.state.clear()
        self.stale = 0
        self._load_state()
        _event("compacted", dropped_rows=dropped, vanished=len(vanished))
        return dropped

    def _summarise(self, summary: LabelSummary, seen: set[str]) -> None:
        clusters: Counter[int] = Counter()
        codes: Counter[str] = Counter()
        for path, entry in self.state.items():
            if path not in seen:
                continue
            if entry.kind == "row" and entry.cluster is not None:
                clusters[int(entry.cluster)] += 1
            elif entry.kind == "error":
                codes[entry.code or "unknown"] += 1
        summary.clusters = dict(sorted(clusters.items()))
        summary.errors_by_code = dict(sorted(codes.items()))
        summary.errors = sum(codes.values())


def summary_dict(summary: LabelSummary) -> dict[str, Any]:
    return {
        "images": summary.images,
        "labelled": summary.labelled,
        "skipped_unchanged": summary.skipped_unchanged,
        "errors": summary.errors,
        "new_errors": summary.new_errors,
        "errors_by_code": summary.errors_by_code,
        "clusters": {str(k): v for k, v in summary.clusters.items()},
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 1),
        "compacted_rows": summary.compacted_rows,
        "output": summary.output,
        "errors_file": summary.errors_file,
        "gallery": summary.gallery,
        "shard": summary.shard,
    }


def format_summary(summary: LabelSummary) -> str:
    """The human summary printed at the end of a run."""
    lines = [
        f"labelled {summary.labelled} new, skipped {summary.skipped_unchanged} unchanged, "
        f"{summary.errors} errors ({summary.images} files in shard {summary.shard}) in {summary.seconds:.1f} s "
        f"({summary.images_per_s:.1f} images/s)",
        "cluster  count",
    ]
    lines += [f"{cluster:>7}  {count}" for cluster, count in summary.clusters.items()]
    if summary.errors_by_code:
        lines.append("errors: " + ", ".join(f"{code}={n}" for code, n in summary.errors_by_code.items()))
        lines.append(f"error rows: {summary.errors_file}")
    lines.append(f"output: {summary.output}")
    if summary.gallery:
        lines.append(f"gallery: {summary.gallery}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- parquet
def write_parquet(journal: Path, output: Path, columns: list[str], row_group: int = 8192) -> None:
    """journal (jsonl) → parquet, streamed in row groups (bounded memory), temp file + rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    top_k_type = pa.list_(pa.struct([("cluster", pa.int32()), ("probability", pa.float64()), ("label", pa.string())]))
    types = {
        "path": pa.string(),
        "cluster": pa.int32(),
        "confidence": pa.float64(),
        "label": pa.string(),
        "top_k": top_k_type,
        "sha256": pa.string(),
    }
    schema = pa.schema([(name, types[name]) for name in columns])
    tmp = output.with_name(output.name + ".tmp")
    codec = JsonlCodec(("path", "cluster"))
    with pq.ParquetWriter(tmp, schema) as writer:
        buffer: list[dict[str, Any]] = []
        for row in AppendLog(journal, codec).recover(truncate=False):
            buffer.append({name: row.get(name) for name in columns})
            if len(buffer) >= row_group:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer = []
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, output)


def read_rows(path: Path, top_k: int = 0) -> list[dict[str, Any]]:
    """Read a labeller output (csv, jsonl or parquet) into dicts — for tests and small folders."""
    fmt = output_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as fh:
            header = fh.readline().rstrip("\n").split(",")
        codec: Codec = CsvCodec(header)
    else:
        codec = JsonlCodec(("path",))
    return list(AppendLog(path, codec).recover(truncate=False))
