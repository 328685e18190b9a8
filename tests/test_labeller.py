"""`deepclust label` on real CIFAR-10 JPEGs mixed with deliberately broken files (real onnxruntime, tiny model).

The kill-and-resume test starts the real CLI as a subprocess, `kill -9`s it once rows are on disk, re-runs it and
checks the rows against an uninterrupted run: none lost, none duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deepclust.cli import app
from serving.core.batch import PipelineOptions, Shard, display_path, run_files, walk_images
from serving.hosts.labeller.labeller import read_rows

PER_CLASS = 30
LONG_NAME = "l" * 240 + ".jpg"
NON_UTF8 = b"caf\xe9-\xff.JPEG"  # Latin-1 bytes: not valid UTF-8
BROKEN = {
    "broken/zero.jpg": "empty",
    "broken/truncated.jpg": "decode_error",
    "broken/random.jpg": "unsupported_format",
    "broken/notes-as-image.jpg": "unsupported_format",
    "broken/huge.png": "too_large",
}


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["label", *args], env=env, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def mixed_dir(cifar_test_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 real CIFAR-10 JPEGs in class folders + broken files + files the walk must ignore or survive."""
    root = tmp_path_factory.mktemp("mixed") / "images"
    for cls in sorted(os.listdir(cifar_test_dir)):
        (root / cls).mkdir(parents=True)
        for name in sorted(os.listdir(cifar_test_dir / cls))[:PER_CLASS]:
            shutil.copyfile(cifar_test_dir / cls / name, root / cls / name)
    good = (root / "cat" / sorted(os.listdir(root / "cat"))[0]).read_bytes()
    broken = root / "broken"
    broken.mkdir()
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (broken / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (broken / "notes-as-image.jpg").write_text("this is a text file, not a JPEG\n")
    from PIL import Image

    Image.new("L", (7000, 6000)).save(broken / "huge.png")  # 42 Mpx > the 40 Mpx default limit
    # survivors: upper-case extension, a 244-byte name, a non-UTF-8 name
    misc = root / "misc"
    misc.mkdir()
    (misc / "UPPER.JPG").write_bytes(good)
    (misc / LONG_NAME).write_bytes(good)
    with open(os.fsencode(misc) + b"/" + NON_UTF8, "wb") as fh:
        fh.write(good)
    # ignored: hidden dir, hidden file, non-image extension
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "x.jpg").write_bytes(good)
    (misc / "._UPPER.JPG").write_bytes(b"\x00\x05\x16\x07")
    (misc / "readme.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def n_good() -> int:
    return 10 * PER_CLASS + 3


def _rows_by_path(path: Path) -> dict[str, dict]:
    rows = read_rows(path)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicated rows"
    return {r["path"]: r for r in rows}


# ------------------------------------------------------------------------------------------------ the walk
def test_walk_is_sorted_filtered_and_survives_odd_names(mixed_dir: Path, n_good: int) -> None:
    paths = list(walk_images(mixed_dir))
    assert paths == list(walk_images(mixed_dir)), "the walk must be deterministic"
    assert len(paths) == n_good + len(BROKEN)
    assert not any(p.startswith(".") or "/." in p for p in paths), "hidden entries must be skipped"
    assert "misc/readme.txt" not in paths
    assert "misc/UPPER.JPG" in paths and f"misc/{LONG_NAME}" in paths
    odd = [p for p in paths if os.fsencode(p).endswith(NON_UTF8)]
    assert len(odd) == 1
    shown = display_path(odd[0])
    assert shown.encode("utf-8") and "\\xe9" in shown and "\\xff" in shown  # printable, valid UTF-8
    keys = [tuple(os.fsencode(part) for part in p.split("/")) for p in paths]
    assert keys == sorted(keys)


def test_shards_are_disjoint_covering_and_stable(mixed_dir: Path) -> None:
    paths = list(walk_images(mixed_dir))
    shards = [{p for p in paths if Shard(i, 4).owns(p)} for i in range(4)]
    assert set().union(*shards) == set(paths)
    assert sum(len(s) for s in shards) == len(paths)
    assert all(len(s) > 0 for s in shards)
    # stable: new files (sorting before, between and after the others) do not move any existing file to another
    # shard; checked on a real folder through the walk, as the labeller shards it
    root = mixed_dir.parent / "grown"
    shutil.copytree(mixed_dir, root, symlinks=True)
    try:
        for rel in ("aaa-first.jpg", "cat/0000-new.jpg", "zzz/last.jpg"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mixed_dir / paths[0], root / rel)
        grown = list(walk_images(root))
        assert len(grown) == len(paths) + 3
        after = [{p for p in grown if Shard(i, 4).owns(p)} for i in range(4)]
        for i in range(4):
            assert shards[i] <= after[i], f"files moved out of shard {i}"
        assert sum(len(s) for s in after) == len(grown)
    finally:
        shutil.rmtree(root)
    with pytest.raises(ValueError):
        Shard.parse("4/4")
    with pytest.raises(ValueError):
        Shard.parse("one/two")


# ------------------------------------------------------------------------------------------- the pipeline
def test_pipeline_matches_the_engine_file_by_file(mixed_dir: Path, tiny_model_dir: Path) -> None:
    """Decoding in worker processes and re-batching must not mix up which result belongs to which file."""
    from serving.core.engine import Engine
    from serving.core.preprocess import ImageError, load_image

    engine = Engine(tiny_model_dir / "model.onnx", max_batch=7)
    paths = list(walk_images(mixed_dir))
    items = list(
        run_files(
            engine, mixed_dir, paths, PipelineOptions(batch_size=7, workers=2, chunk_size=5, with_probabilities=True)
        )
    )
    assert [i.rel for i in items] == paths
    for item in items:
        data = (mixed_dir / item.rel).read_bytes() if item.rel != "broken/huge.png" else None
        if data is not None:
            assert item.sha256 == hashlib.sha256(data).hexdigest()
        try:
            pixels = load_image(data, engine.input_size) if data is not None else None
        except ImageError as exc:
            assert not item.ok and item.result.error.code == exc.code
            continue
        if pixels is None:
            assert item.result.error.code == "too_large"
            continue
        expected = engine.run(pixels[None])
        assert item.result.cluster == int(expected.cluster[0]), item.rel
        np.testing.assert_allclose(item.probabilities, expected.probabilities[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- the CLI
def test_label_csv_with_broken_files(mixed_dir: Path, tiny_model_dir: Path, tmp_path: Path, n_good: int) -> None:
    out = tmp_path / "labels.csv"
    code, text = _cli(
        str(mixed_dir),
        "--model",
        str(tiny_model_dir),
        "-o",
        str(out),
        "--top-k",
        "3",
        "--workers",
        "2",
        "--batch-size",
        "16",
    )
    assert code == 1, text  # finished, but some files are in the errors file
    rows = _rows_by_path(out)
    assert len(rows) == n_good
    header = out.read_text(encoding="utf-8").splitlines()[0]
    assert header == "path,cluster,confidence,label,top_k,sha256"
    from conftest import CIFAR10_CLASSES

    for path, row in rows.items():
        assert 0 <= row["cluster"] < 10 and 0.0 < row["confidence"] <= 1.0
        assert row["label"] == CIFAR10_CLASSES[row["cluster"]]
        assert [t["cluster"] for t in row["top_k"]][0] == row["cluster"] and len(row["top_k"]) == 3
        probs = [t["probability"] for t in row["top_k"]]
        assert probs == sorted(probs, reverse=True)
        if "\\x" not in path:
            assert row["sha256"] == hashlib.sha256((mixed_dir / path).read_bytes()).hexdigest()
    errors = [json.loads(line) for line in (tmp_path / "labels.errors.jsonl").read_text().splitlines()]
    assert {e["path"]: e["code"] for e in errors} == BROKEN
    assert all(e["message"] for e in errors)
    assert "errors: " in text and "too_large=1" in text  # the summary names the errors


def test_formats_agree(mixed_dir: Path, tiny_model_dir: Path, tmp_path: Path, n_good: int) -> None:
    results = {}
    for fmt in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"labels.{fmt}"
        code, text = _cli(
            str(mixed_dir),
            "-m",
            str(tiny_model_dir),
            "-o",
            str(out),
            "--top-k",
            "2",
            "--errors",
            str(tmp_path / f"errors-{fmt}.jsonl"),
            "--workers",
            "1",
        )
        assert code == 1, text
        rows = _rows_by_path(out)
        assert len(rows) == n_good
        results[fmt] = {
            p: (r["cluster"], r["label"], r["sha256"], [t["cluster"] for t in r["top_k"]]) for p, r in rows.items()
        }
    assert results["csv"] == results["jsonl"] == results["parquet"]
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "labels.parquet")
    assert schema.names == ["path", "cluster", "confidence", "label", "top_k", "sha256"]


def test_shards_via_cli_and_job_completion_index(mixed_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    full_code, _ = _cli(str(mixed_dir), "-m", str(tiny_model_dir), "-o", str(tmp_path / "full.jsonl"))
    full = set(_rows_by_path(tmp_path / "full.jsonl"))
    seen: list[set[str]] = []
    for index in range(3):
        env = {"JOB_COMPLETION_INDEX": str(index), "DEEPCLUST_SHARD_COUNT": "3"}
        code, text = _cli(
            str(mixed_dir), "-m", str(tiny_model_dir), "-o", str(tmp_path / "part-{shard}.jsonl"), env=env
        )
        assert code in (0, 1), text
        seen.append(set(_rows_by_path(tmp_path / f"part-{index}.jsonl")))
    assert set().union(*seen) == full
    assert sum(len(s) for s in seen) == len(full)
    code, _ = _cli(str(mixed_dir), "-m", str(tiny_model_dir), "-o", str(tmp_path / "x.jsonl"), "--shard", "1/3")
    assert _rows_by_path(tmp_path / "x.jsonl").keys() == seen[1]
    assert full_code == 1


def test_rerun_skips_unchanged_and_updates_changed_files(mixed_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(mixed_dir / "cat", root / "cat")
    shutil.copytree(mixed_dir / "dog", root / "dog")
    out = tmp_path / "labels.jsonl"
    args = [str(root), "-m", str(tiny_model_dir), "-o", str(out)]
    assert _cli(*args)[0] == 0
    before = _rows_by_path(out)
    code, text = _cli(*args)
    assert code == 0 and f"labelled 0 new, skipped {len(before)} unchanged" in text
    changed, removed = sorted(before)[0], sorted(before)[1]
    shutil.copyfile(root / sorted(before)[-1], root / changed)  # content changes
    (root / removed).unlink()
    (root / "dog" / "zero.jpg").write_bytes(b"")
    code, text = _cli(*args)
    assert code == 1 and "labelled 1 new" in text, text
    after = _rows_by_path(out)
    assert set(after) == set(before) - {removed}
    assert after[changed]["sha256"] == before[sorted(before)[-1]]["sha256"]
    (root / "dog" / "zero.jpg").unlink()
    code, _ = _cli(*args)
    assert code == 0, "an error row for a file that is gone must not count"
    assert not (tmp_path / "labels.errors.jsonl").read_text().strip()


def test_resume_after_a_torn_write(mixed_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A write cut in the middle of a line (what kill -9 or a power cut leaves) is truncated and redone."""
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"labels.{fmt}"
        args = [str(mixed_dir), "-m", str(tiny_model_dir), "-o", str(out)]
        assert _cli(*args)[0] == 1
        reference = _rows_by_path(out)
        journal = out if fmt == "csv" else out.with_name(out.name + ".journal.jsonl")
        data = journal.read_bytes()
        cut = data.rfind(b"\n", 0, len(data) // 2) + 25  # half the rows, then 25 bytes of the next one
        journal.write_bytes(data[:cut] + b"\x00garbage")
        if fmt == "parquet":
            out.unlink()
        code, text = _cli(*args)
        assert code == 1, text
        resumed = _rows_by_path(out)
        assert resumed.keys() == reference.keys()
        assert all(resumed[p]["cluster"] == reference[p]["cluster"] for p in reference)


def test_usage_errors_exit_2(mixed_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    m = str(tiny_model_dir)
    assert _cli(str(mixed_dir), "-m", m, "-o", str(tmp_path / "x.txt"))[0] == 2
    assert _cli(str(tmp_path / "missing"), "-m", m, "-o", str(tmp_path / "x.csv"))[0] == 2
    assert _cli(str(mixed_dir), "-m", str(tmp_path), "-o", str(tmp_path / "x.csv"))[0] == 2
    assert _cli(str(mixed_dir), "-m", m, "-o", str(tmp_path / "x.csv"), "--shard", "2/2")[0] == 2
    code, text = _cli(str(mixed_dir), "-m", m, "-o", str(tmp_path / "x.csv"), env={"JOB_COMPLETION_INDEX": "0"})
    assert code == 2 and "shard count" in text
    out = tmp_path / "y.jsonl"
    assert _cli(str(mixed_dir / "cat"), "-m", m, "-o", str(out))[0] == 0
    code, text = _cli(str(mixed_dir / "cat"), "-m", m, "-o", str(out), "--top-k", "2")
    assert code == 2 and "--overwrite" in text  # never mixes rows of two different runs in one file
    assert _cli(str(mixed_dir / "cat"), "-m", m, "-o", str(out), "--top-k", "2", "--overwrite")[0] == 0
    assert all("top_k" in r for r in read_rows(out))


# ----------------------------------------------------------------------------------------- kill -9, resume
def _symlink_tree(cifar_test_dir: Path, mixed_dir: Path, root: Path) -> int:
    """All 10,000 CIFAR-10 test JPEGs (symlinks: cheap) + the broken files: long enough to kill mid-run."""
    n = 0
    for cls in sorted(os.listdir(cifar_test_dir)):
        (root / cls).mkdir(parents=True)
        for name in os.listdir(cifar_test_dir / cls):
            os.symlink(cifar_test_dir / cls / name, root / cls / name)
            n += 1
    shutil.copytree(mixed_dir / "broken", root / "broken")
    return n


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _label_subprocess(root: Path, model: Path, out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "deepclust.cli",
        "label",
        str(root),
        "-m",
        str(model),
        "-o",
        str(out),
        "--batch-size",
        "16",
        "--workers",
        "1",
        "--threads",
        "1",
        "--progress",
        "log",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_kill_9_and_resume_loses_and_duplicates_nothing(
    fmt: str, cifar_test_dir: Path, mixed_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    n_images = _symlink_tree(cifar_test_dir, mixed_dir, root)
    reference_out = tmp_path / "ref" / f"labels.{fmt}"
    # The reference runs first and alone: beside the victim it competed for the cores and moved the kill point.
    ref = _label_subprocess(root, tiny_model_dir, reference_out)
    _, ref_stderr = ref.communicate(timeout=300)
    assert ref.returncode == 1, ref_stderr.decode()
    out = tmp_path / "run" / f"labels.{fmt}"
    journal = out if fmt == "csv" else out.with_name(out.name + ".journal.jsonl")
    victim = _label_subprocess(root, tiny_model_dir, out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and victim.poll() is None:
            if journal.exists() and journal.stat().st_size > 40_000:  # a few hundred rows are on disk
                break
            time.sleep(0.005)
        children = _children(victim.pid)
        assert children, "the decode worker should be running"
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        lines_at_kill = journal.read_bytes().count(b"\n")
        assert 0 < lines_at_kill < n_images, lines_at_kill
        deadline = time.monotonic() + 20  # workers must not outlive a killed labeller (no orphans)
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "orphaned worker processes"
    finally:
        for proc in (victim, ref):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    resumed = _label_subprocess(root, tiny_model_dir, out)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 1, stderr.decode()
    assert b"skipped" in stdout and b"unchanged" in stdout
    summary = json.loads(next(line for line in stderr.decode().splitlines() if '"summary"' in line))
    assert summary["skipped_unchanged"] >= lines_at_kill - 1  # every complete row on disk is kept
    assert summary["labelled"] + summary["skipped_unchanged"] + summary["new_errors"] == n_images + len(BROKEN)

    got, want = _rows_by_path(out), _rows_by_path(reference_out)  # _rows_by_path asserts no duplicates
    assert len(want) == n_images
    assert got.keys() == want.keys(), "rows lost or extra"
    for path, row in want.items():
        assert got[path]["cluster"] == row["cluster"] and got[path]["sha256"] == row["sha256"], path
        assert abs(got[path]["confidence"] - row["confidence"]) < 1e-4
    errors = [json.loads(x)["path"] for x in (out.parent / "labels.errors.jsonl").read_text().splitlines()]
    assert sorted(errors) == sorted(BROKEN)
