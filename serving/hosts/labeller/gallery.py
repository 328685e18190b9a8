"""`deepclust label --gallery report.html`: one self-contained HTML page to eyeball a clustering.

Per cluster: size, mean confidence, the most and least confident examples (thumbnails embedded as `data:` URIs, so
the page can be mailed or attached to a CI run), and — when the folder has class sub-folders (`DIR/<class>/x.jpg`,
the ImageFolder layout) — ACC/NMI/ARI from `serving.core.quality` and the confusion matrix as an inline SVG (no plotting
library). Memory is bounded: only the top/bottom `examples` rows per cluster are kept (two heaps per cluster) plus
two small int arrays for the metrics; thumbnails are made from those few files only, after the pass over the rows.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.core.batch import fs_path
from serving.core.preprocess import DecodeLimits, decode_image

THUMB_PX = 96


@dataclass
class ClusterStats:
    """Running statistics of one cluster; `top`/`bottom` are bounded heaps of (confidence, path)."""

    size: int = 0
    confidence_sum: float = 0.0
    top: list[tuple[float, str]] = field(default_factory=list)  # min-heap of the most confident
    bottom: list[tuple[float, str]] = field(default_factory=list)  # min-heap of (-confidence) = least confident

    def add(self, confidence: float, path: str, keep: int) -> None:
        self.size += 1
        self.confidence_sum += confidence
        _push_bounded(self.top, (confidence, path), keep)
        _push_bounded(self.bottom, (-confidence, path), keep)

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.size if self.size else 0.0

    def most_confident(self) -> list[tuple[float, str]]:
        return sorted(self.top, key=lambda t: (-t[0], t[1]))

    def least_confident(self) -> list[tuple[float, str]]:
        return sorted(((-c, p) for c, p in self.bottom), key=lambda t: (t[0], t[1]))


def _push_bounded(heap: list[tuple[float, str]], item: tuple[float, str], keep: int) -> None:
    if len(heap) < keep:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


@dataclass
class GalleryData:
    clusters: dict[int, ClusterStats]
    n: int
    truth_names: list[str]  # class sub-folder names (sorted) when ground truth exists, else []
    y_true: np.ndarray | None
    y_pred: np.ndarray | None


def collect(rows: Iterable[dict[str, Any]], examples: int) -> GalleryData:
    """One pass over the rows: per-cluster stats, and the class sub-folder of each path (ground truth)."""
    clusters: dict[int, ClusterStats] = {}
    truth: array[int] = array("l")
    pred: array[int] = array("l")
    class_ids: dict[str, int] = {}
    n = 0
    for row in rows:
        cluster, confidence, path = int(row["cluster"]), float(row["confidence"]), str(row["path"])
        clusters.setdefault(cluster, ClusterStats()).add(confidence, path, examples)
        n += 1
        parts = path.rsplit("/", 2)
        if len(parts) >= 2:  # images directly in DIR have no folder label: left out of the metrics
            truth.append(class_ids.setdefault(parts[-2], len(class_ids)))
            pred.append(cluster)
    if len(class_ids) < 2:
        return GalleryData(clusters, n, [], None, None)
    # class ids in sorted-name order, for a readable confusion matrix
    names = sorted(class_ids)
    remap = np.zeros(len(class_ids), np.int64)
    for rank, name in enumerate(names):
        remap[class_ids[name]] = rank
    y_true = remap[np.frombuffer(truth, dtype=np.int_).astype(np.int64)]
    return GalleryData(clusters, n, names, y_true, np.frombuffer(pred, dtype=np.int_).astype(np.int64))


# ---------------------------------------------------------------------------------------------- rendering
def thumbnail_uri(root: Path, display: str, limits: DecodeLimits) -> str | None:
    """A small PNG of the file as a data: URI, or None if it cannot be read any more."""
    try:
        path = fs_path(root, display)
        if os.path.getsize(path) > limits.max_bytes:
            return None
        with open(path, "rb") as fh:
            image = decode_image(fh.read(), limits)
        image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    except Exception:  # a file deleted or changed since labelling must not break the report
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_svg(table: np.ndarray, row_labels: list[str], col_labels: list[str]) -> str:
    """Rows = clusters, columns = classes; cells shaded by the row-normalised count, with the count printed."""
    cell, left, top = 44, 150, 110
    n_rows, n_cols = table.shape
    width, height = left + cell * n_cols + 10, top + cell * n_rows + 10
    row_sums = np.maximum(table.sum(axis=1, keepdims=True), 1)
    share = table / row_sums
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="confusion matrix" font-family="sans-serif">',
        f'<text x="{left}" y="16" font-size="13">columns: true class (folder) · rows: cluster</text>',
    ]
    for j, name in enumerate(col_labels):
        x, y = left + j * cell + cell / 2, top - 8
        parts.append(
            f'<text x="{x}" y="{y}" font-size="11" transform="rotate(-50 {x} {y})">{html.escape(name[:18])}</text>'
        )
    for i, name in enumerate(row_labels):
        y = top + i * cell
        parts.append(
            f'<text x="{left - 8}" y="{y + cell / 2 + 4}" font-size="12" text-anchor="end">'
            f"{html.escape(name[:22])}</text>"
        )
        for j in range(n_cols):
            value = float(share[i, j])
            shade = int(round(255 - 200 * value))
            fill = f"rgb({shade},{shade},255)"
            text_colour = "#fff" if value > 0.55 else "#222"
            x = left + j * cell
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="{fill}">'
                f"<title>{html.escape(name)} × {html.escape(col_labels[j])}: {int(table[i, j])}</title></rect>"
            )
            parts.append(
                f'<text x="{x + (cell - 2) / 2}" y="{y + cell / 2 + 3}" font-size="11" text-anchor="middle" '
                f'fill="{text_colour}">{int(table[i, j])}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}.muted{color:#666}
table.metrics td,table.metrics th{padding:4px 12px;text-align:left}
.cluster{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:16px 0}
.cluster h2{margin:0 0 6px;font-size:18px}
.strip{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 10px}
figure{margin:0;text-align:center;font-size:11px;width:72px}
figure img{width:64px;height:64px;image-rendering:pixelated;border:1px solid #ccc;object-fit:contain;background:#eee}
figure .missing{width:64px;height:64px;border:1px dashed #c00;display:inline-block}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
"""


def _strip(items: list[tuple[float, str]], root: Path, limits: DecodeLimits) -> str:
    figures = []
    for confidence, path in items:
        uri = thumbnail_uri(root, path, limits)
        image = (
            f'<img src="{uri}" alt="{html.escape(path)}" title="{html.escape(path)}">'
            if uri
            else f'<span class="missing" title="{html.escape(path)} (unreadable)"></span>'
        )
        figures.append(f"<figure>{image}<figcaption>{confidence:.3f}</figcaption></figure>")
    return '<div class="strip">' + "".join(figures) + "</div>"


def render(
    data: GalleryData,
    *,
    root: Path,
    model_name: str,
    class_names: list[str] | None,
    k: int | None,
    errors: int = 0,
    limits: DecodeLimits = DecodeLimits(),
) -> str:
    """The whole page as one string (it is small: a few hundred thumbnails at most)."""
    from serving.core.quality import evaluate_clustering

    def cluster_title(cluster: int) -> str:
        if class_names and 0 <= cluster < len(class_names):
            return f"cluster {cluster} · {class_names[cluster]}"
        return f"cluster {cluster}"

    head = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>deepclust gallery · {html.escape(model_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Cluster gallery</h1><p class='muted'>model <b>{html.escape(model_name)}</b> · "
        f"{data.n} images · {len(data.clusters)} clusters used"
        + (f" of K={k}" if k else "")
        + f" · {errors} errors · folder {html.escape(str(root))}</p>",
    ]
    body: list[str] = []
    purity: dict[int, tuple[str, float]] = {}
    if data.y_true is not None and data.y_pred is not None and data.n:
        report = evaluate_clustering(data.y_true, data.y_pred)
        body.append(
            "<h2>Agreement with the folder labels</h2><table class='metrics' id='metrics'>"
            "<tr><th>ACC</th><th>NMI</th><th>ARI</th><th>n</th></tr>"
            f"<tr><td id='acc'>{report.acc:.4f}</td><td id='nmi'>{report.nmi:.4f}</td>"
            f"<td id='ari'>{report.ari:.4f}</td><td>{report.n}</td></tr></table>"
            f"<p class='muted'>{report.n} of {data.n} images sit in a class sub-folder "
            f"({len(data.truth_names)} folders); the others are left out of these figures.</p>"
        )
        table = np.asarray(report.confusion, dtype=np.int64)
        clusters_sorted = sorted(report.cluster_sizes)
        row_labels = [cluster_title(c) for c in clusters_sorted]
        body.append("<h3>Confusion matrix</h3>" + confusion_svg(table, row_labels, data.truth_names))
        for r, cluster in enumerate(clusters_sorted):
            best = int(np.argmax(table[r]))
            purity[cluster] = (data.truth_names[best], float(table[r, best] / max(table[r].sum(), 1)))
    for cluster in sorted(data.clusters):
        stats = data.clusters[cluster]
        majority = ""
        if cluster in purity:
            name, share = purity[cluster]
            majority = f" · majority folder <b>{html.escape(name)}</b> ({share:.0%})"
        body.append(
            f"<section class='cluster' id='cluster-{cluster}'><h2>{html.escape(cluster_title(cluster))}</h2>"
            f"<div class='muted'>size <b class='size'>{stats.size}</b> · mean confidence "
            f"<b>{stats.mean_confidence:.3f}</b>{majority}</div>"
            f"<div>most confident</div>{_strip(stats.most_confident(), root, limits)}"
            f"<div>least confident</div>{_strip(stats.least_confident(), root, limits)}</section>"
        )
    if not data.clusters:
        body.append("<p>No labelled images.</p>")
    return "".join(head + body) + "</body></html>\n"


def build_gallery(
    *,
    rows: Iterable[dict[str, Any]],
    root: Path,
    output: Path,
    model_name: str,
    class_names: list[str] | None = None,
    k: int | None = None,
    examples: int = 8,
    errors: int = 0,
) -> Path:
    """Stream `rows` (labeller output rows), keep only what the page shows, write `output` atomically."""
    data = collect(rows, examples)
    page = render(data, root=root, model_name=model_name, class_names=class_names, k=k, errors=errors)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    return output
