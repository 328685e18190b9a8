"""`deepclust label --gallery`: the HTML report renders in headless Chromium (real browser, real thumbnails)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from deepclust.cli import app
from serving.core.quality import evaluate_clustering
from serving.hosts.labeller.gallery import ClusterStats, build_gallery, collect
from serving.hosts.labeller.labeller import read_rows

CHROMIUM = "/usr/bin/chromium"
PER_CLASS = 20


def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *extra,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def labelled(cifar_test_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gallery") / "images"
    for cls in sorted(os.listdir(cifar_test_dir)):
        (root / cls).mkdir(parents=True)
        for name in sorted(os.listdir(cifar_test_dir / cls))[:PER_CLASS]:
            shutil.copyfile(cifar_test_dir / cls / name, root / cls / name)
    (root / "broken").mkdir()
    (root / "broken" / "zero.jpg").write_bytes(b"")
    out = root.parent / "labels.jsonl"
    report = root.parent / "report.html"
    result = CliRunner().invoke(
        app,
        ["label", str(root), "-m", str(tiny_model_dir), "-o", str(out), "--gallery", str(report)],
        catch_exceptions=False,
    )
    assert result.exit_code == 1, result.output  # the zero-byte file is an error
    assert f"gallery: {report}" in result.output
    return root, out, report


def test_report_is_self_contained_and_its_figures_are_right(labelled) -> None:
    root, out, report = labelled
    page = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "every resource must be embedded"
    rows = read_rows(out)
    clusters = sorted({r["cluster"] for r in rows})
    for cluster in clusters:
        members = [r for r in rows if r["cluster"] == cluster]
        section = page.split(f"id='cluster-{cluster}'")[1].split("</section>")[0]
        assert f"size <b class='size'>{len(members)}</b>" in section
        mean = np.mean([r["confidence"] for r in members])
        assert f"mean confidence <b>{mean:.3f}</b>" in section
        n_thumbs = section.count('src="data:image/png;base64,')
        assert n_thumbs == 2 * min(8, len(members))
    classes = sorted({r["path"].split("/")[0] for r in rows})  # the class folders that have rows
    assert len(classes) == 10
    y_true = np.array([classes.index(r["path"].split("/")[0]) for r in rows])
    expected = evaluate_clustering(y_true, np.array([r["cluster"] for r in rows]))
    assert f"<td id='acc'>{expected.acc:.4f}</td>" in page
    assert f"<td id='nmi'>{expected.nmi:.4f}</td>" in page
    assert "<svg" in page and "confusion matrix" in page
    assert "1 errors" in page


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make system-deps)")
def test_report_renders_in_headless_chromium(labelled, repo_root: Path, tmp_path: Path) -> None:
    _, _, report = labelled
    artifacts = repo_root / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    screenshot = artifacts / "gallery.png"
    screenshot.unlink(missing_ok=True)
    url = report.resolve().as_uri()
    shot = _chromium(url, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000")
    assert shot.returncode == 0, shot.stderr.decode(errors="replace")[-2000:]
    image = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
    assert image.shape == (2000, 1280)
    assert image.std() > 20, "the page rendered blank"  # text, matrix and thumbnails give contrast
    dom = _chromium(url, tmp_path / "profile2", "--dump-dom").stdout.decode()
    assert "Cluster gallery" in dom and "Agreement with the folder labels" in dom
    assert dom.count("<img") >= 10 and "<svg" in dom and "<rect" in dom


def test_cluster_stats_keep_only_the_extremes() -> None:
    stats = ClusterStats()
    rng = np.random.default_rng(0)
    values = rng.random(10_000)
    for i, value in enumerate(values):
        stats.add(float(value), f"img{i}.jpg", keep=5)
    assert len(stats.top) == 5 and len(stats.bottom) == 5
    assert [c for c, _ in stats.most_confident()] == sorted(values, reverse=True)[:5]
    assert [c for c, _ in stats.least_confident()] == sorted(values)[:5]
    assert stats.size == 10_000 and abs(stats.mean_confidence - values.mean()) < 1e-9


def test_flat_folder_has_no_ground_truth_section(tmp_path: Path) -> None:
    rows = [{"path": f"x{i}.jpg", "cluster": i % 3, "confidence": 0.5} for i in range(9)]
    data = collect(rows, examples=2)
    assert data.y_true is None
    page = build_gallery(rows=rows, root=tmp_path, output=tmp_path / "r.html", model_name="m", examples=2).read_text()
    assert "Agreement with the folder labels" not in page and "<svg" not in page
    assert page.count('class="missing"') == 3 * 2 * 2  # files absent: placeholders, not a crash
