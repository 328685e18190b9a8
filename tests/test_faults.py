"""Faults: a TorchServe worker killed under load (the service recovers by itself; failed requests and the recovery
time are counted and printed), the labeller SIGKILLed at random points over several runs (no row lost or
duplicated vs an uninterrupted run), and tampered model files refused at start with a clear message.

Loops are bounded in count and time; every process started here is stopped here. One TorchServe start for the module
(the tiny contract model: a worker restart is what is measured, and it keeps the module fast;
`DEEPCLUST_FAULTS_MODEL=model_store/cifar10-lite0` measures the worker kill on the real model).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO_ROOT, cifar_jpegs, free_port, running_service

from serving.client import Client
from serving.hosts.labeller.labeller import read_rows

pytestmark = pytest.mark.slow  # starts a real TorchServe


# ---------------------------------------------------------------------------------------------- worker kill
@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    with running_service(
        tmp_path_factory,
        model=os.environ.get("DEEPCLUST_FAULTS_MODEL", str(tiny_model_dir)),  # e.g. model_store/cifar10-lite0
        batch_size=8,
        max_batch_delay_ms=10,
        intra_op_threads=1,
    ) as host:
        yield host


@pytest.fixture(scope="module")
def images(cifar_test_dir) -> list[bytes]:
    return cifar_jpegs(cifar_test_dir, 4)


def _workers(service) -> list[psutil.Process]:
    jvm = psutil.Process(service.process.pid)
    return [p for p in jvm.children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())]


def test_killed_worker_is_replaced_and_the_service_recovers(service, images):
    """4 closed-loop clients; SIGKILL the Python worker after 20 answers; keep going until 3 s of clean answers follow
    the fault (at most 60 s). TorchServe restarts the worker by itself; requests caught by the fault fail with a
    clear error (never hang), every later one succeeds."""
    (victim,) = _workers(service)
    records: list[tuple[float, float, int]] = []  # (sent, done, status or 0 for a transport error)
    lock = threading.Lock()
    state = {"stop": False, "killed_at": None}

    def client_loop(offset: int) -> None:
        i = offset
        with Client(service.config.base_url, service.config.model_name) as client:
            while not state["stop"]:
                sent = time.monotonic()
                try:
                    status, body = client.post(images[i % len(images)], "application/octet-stream")
                    if status == 200 and not (isinstance(body, list) and "cluster" in body[0]):
                        status = -1
                except OSError:
                    status = 0
                with lock:
                    records.append((sent, time.monotonic(), status))
                i += 4

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        # Kill once the service has answered 20 requests (not after a fixed 2 s, which on a loaded machine could
        # mean no request at all before the fault).
        warm_deadline = time.monotonic() + 120
        while time.monotonic() < warm_deadline:
            with lock:
                if sum(1 for r in records if r[2] == 200) >= 20:
                    break
            time.sleep(0.05)
        state["killed_at"] = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        deadline = state["killed_at"] + 60
        while time.monotonic() < deadline:
            time.sleep(0.2)
            with lock:
                after = [r for r in records if r[1] > state["killed_at"]]
            failures = [r for r in after if r[2] != 200]
            clean_since = failures[-1][1] if failures else state["killed_at"]
            if any(r[2] == 200 and r[0] > clean_since for r in after) and time.monotonic() - clean_since > 3:
                break
    finally:
        state["stop"] = True
        for t in threads:
            t.join(30)
    killed_at = state["killed_at"]
    before = [r for r in records if r[1] <= killed_at]
    after = [r for r in records if r[1] > killed_at]
    failed = [r for r in after if r[2] != 200]
    recovered_at = max((r[1] for r in failed), default=killed_at)
    first_ok = min((r[1] for r in after if r[2] == 200 and r[0] >= recovered_at - 1e-9), default=None)
    assert first_ok is not None, f"no successful request after the worker kill ({len(failed)} failed)"
    recovery_s = first_ok - killed_at
    statuses = sorted({r[2] for r in failed})
    print(
        f"\nworker kill: {len(before)} requests before, {len(after)} after, {len(failed)} failed "
        f"(statuses {statuses}), recovery {recovery_s:.2f} s"
    )
    assert all(r[2] == 200 for r in before), "requests failed before the fault"
    assert victim.pid not in {p.pid for p in _workers(service)}
    assert len(_workers(service)) == 1, "TorchServe did not start a replacement worker"
    assert not victim.is_running()
    assert recovery_s < 60
    assert len(failed) < 100, f"{len(failed)} requests failed: the fault was not contained"
    assert set(statuses) <= {0, 500, 502, 503, 504, 507}, f"unexpected statuses {statuses}"
    with Client(service.config.base_url, service.config.model_name) as client:
        status, body = client.post(images[0], "image/jpeg")
    assert status == 200 and "cluster" in body[0]


# ------------------------------------------------------------------------------------ labeller: random kills
N_IMAGES = 1200
BROKEN = {"broken/zero.jpg": b"", "broken/random.jpg": os.urandom(2048), "broken/cut.jpg": None}


@pytest.fixture(scope="module")
def label_tree(cifar_test_dir, tmp_path_factory) -> Path:
    """1,200 real JPEGs (symlinks) in class folders + 3 broken files."""
    root = tmp_path_factory.mktemp("kill") / "images"
    per_class = N_IMAGES // 10
    for cls in sorted(os.listdir(cifar_test_dir)):
        (root / cls).mkdir(parents=True)
        for name in sorted(os.listdir(cifar_test_dir / cls))[:per_class]:
            os.symlink(cifar_test_dir / cls / name, root / cls / name)
    (root / "broken").mkdir()
    good = next((cifar_test_dir / "cat").glob("*.jpg")).read_bytes()
    for rel, data in BROKEN.items():
        (root / rel).write_bytes(good[: len(good) // 3] if data is None else data)
    return root


def _label(root: Path, model: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepclust.cli", "label", str(root), "-m", str(model), "-o", str(out),
           "--batch-size", "16", "--workers", "1", "--threads", "1", "--progress", "none"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_labeller_killed_at_random_points_loses_and_duplicates_nothing(label_tree, tiny_model_dir, tmp_path):
    """Five SIGKILLs: one at a random time during start-up, four at random row counts (so that they land mid-run
    whatever the machine's speed); a re-run after each; the final output must equal an uninterrupted run's."""
    # Fixed seed (the same kill points on every run); DEEPCLUST_KILL_SEED=N explores others. Printed on failure.
    seed = int(os.environ.get("DEEPCLUST_KILL_SEED", "20240617"))
    print(f"\nlabeller kill seed {seed} (rerun with DEEPCLUST_KILL_SEED={seed})")
    rng = random.Random(seed)
    total = N_IMAGES + len(BROKEN)
    reference = tmp_path / "ref" / "labels.jsonl"
    # The uninterrupted reference runs first, alone: running it beside the victims made the kill points depend on
    # how the two competed for the cores.
    ref = _label(label_tree, tiny_model_dir, reference)
    processes = [ref]
    out = tmp_path / "run" / "labels.jsonl"
    errors = out.with_name("labels.errors.jsonl")
    kills, started = [], time.monotonic()
    try:
        assert ref.wait(300) == 1, ref.stderr.read().decode()[-2000:]
        targets = [None] + sorted(rng.randint(1, N_IMAGES - 50) for _ in range(4))
        for target in targets:
            victim = _label(label_tree, tiny_model_dir, out)
            processes.append(victim)
            if target is None:  # during start-up (imports, model load, walk)
                time.sleep(rng.uniform(0.05, 1.5))
            else:
                deadline = time.monotonic() + 60
                while victim.poll() is None and time.monotonic() < deadline:
                    if _lines(out) + _lines(errors) >= target:
                        break
                    time.sleep(0.002)
            finished = victim.poll() is not None
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            kills.append({"target": target, "rows_on_disk": _lines(out), "finished_before_kill": finished})
        final = _label(label_tree, tiny_model_dir, out)
        processes.append(final)
        assert final.wait(120) == 1, final.stderr.read().decode()[-2000:]
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
    print(f"\nlabeller kills (seed {seed}, {time.monotonic() - started:.1f} s): {json.dumps(kills)}")
    mid_run = [k for k in kills if k["target"] and not k["finished_before_kill"] and 0 < k["rows_on_disk"] < total]
    assert mid_run, f"no kill landed mid-run (seed {seed}): {kills}"

    raw_lines = out.read_text(encoding="utf-8").splitlines()
    got, want = read_rows(out), read_rows(reference)
    got_paths = [r["path"] for r in got]
    assert len(got_paths) == len(set(got_paths)) == len(raw_lines), "duplicated rows"
    assert len(want) == N_IMAGES
    assert set(got_paths) == {r["path"] for r in want}, "rows lost or extra"
    by_path = {r["path"]: r for r in got}
    for row in want:
        mine = by_path[row["path"]]
        assert mine["cluster"] == row["cluster"] and mine["sha256"] == row["sha256"], row["path"]
        assert abs(mine["confidence"] - row["confidence"]) < 1e-4
    error_paths = [json.loads(line)["path"] for line in errors.read_text().splitlines()]
    assert sorted(error_paths) == sorted(BROKEN), error_paths


# ------------------------------------------------------------------------------------------ tampered models
def _flip_one_byte(path: Path) -> None:
    """Same size, one byte changed in the middle: only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_same_size_tampered_model_is_refused_by_serve_and_label(tmp_path, tiny_model_dir):
    """Extends tests/test_service.py (an appended byte, `prepare()` only): a same-size one-byte change, through the
    real CLIs. `deepclust serve` exits 2 before starting TorchServe with a message naming the file, the mismatch and
    the rebuild command; `deepclust label` refuses the same file with exit 2."""
    folder = tmp_path / "store" / "tampered"
    shutil.copytree(tiny_model_dir, folder)
    size = (folder / "model.onnx").stat().st_size
    _flip_one_byte(folder / "model.onnx")
    assert (folder / "model.onnx").stat().st_size == size
    env = {**os.environ, "DEEPCLUST_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "deepclust.cli"]
    serve = subprocess.run(
        [*cli, "serve", "--model", str(folder), "--port", str(free_port()), "--metrics-port", str(free_port())],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert serve.returncode == 2, serve.stdout + serve.stderr
    assert "does not match the model card" in serve.stderr and "model.onnx" in serve.stderr
    assert "rebuild it with" in serve.stderr
    assert "ready" not in serve.stdout
    assert not (tmp_path / "cache" / "mar").exists(), "an archive was built from a tampered model"

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    label = subprocess.run(
        [*cli, "label", str(images), "-m", str(folder), "-o", str(tmp_path / "out.csv"), "--progress", "none"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert label.returncode == 2, label.stdout + label.stderr
    assert "does not match the model card" in label.stderr + label.stdout


def test_tampered_card_or_unlisted_model_is_refused(tmp_path, tiny_model_dir):
    """The card edited instead of the model (a forged digest), or a model file the card does not list."""
    from serving.hosts.torchserve.server import ServeConfig, TorchServeHost

    forged = tmp_path / "forged"
    shutil.copytree(tiny_model_dir, forged)
    card = json.loads((forged / "model.json").read_text())
    entry = card["files"]["model.onnx"]
    entry["sha256"] = "f" * 64
    (forged / "model.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="does not match the model card"):
        TorchServeHost(ServeConfig(model=str(forged), cache_dir=tmp_path / "c1")).prepare()

    unlisted = tmp_path / "unlisted"
    shutil.copytree(tiny_model_dir, unlisted)
    shutil.copyfile(unlisted / "model.onnx", unlisted / "model.int8.onnx")  # present, but not in the card
    with pytest.raises(ValueError, match="not listed in the model card"):
        TorchServeHost(ServeConfig(model=str(unlisted), variant="int8", cache_dir=tmp_path / "c2")).prepare()
