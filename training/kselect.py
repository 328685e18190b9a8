"""The number of clusters K, estimated without labels on frozen features: prediction strength over a K range.

Criterion (Tibshirani & Walther, "Cluster validation by prediction strength", JCGS 2005), on the L2-normalised
frozen features reduced by PCA: split the images into two random halves A and B; cluster each half with k-means
into K groups; assign B's images to A's centroids; for every cluster of B, the share of its pairs that A's
centroids also put together. The prediction strength PS(K) is the *worst* cluster's share (averaged over a few
random splits). A K whose clusters are real structure of the data is reproduced by a clustering of other images;
a K that cuts a real group in two is not, and its worst cluster shows it. The estimate is the **largest K with
PS(K) >= threshold** (0.8, the paper's recommendation); when no K >= 3 reaches it, the K with the highest PS.

Why this one (docs/design.md, "K without labels"): it needs nothing but the frozen features (seconds of k-means, no
training), it asks a question of generalisation (does a clustering of other images agree?) rather than of
compactness, and its decision rule does not depend on the scale of the features. Silhouette, Calinski-Harabasz and
the eigengap of a kNN graph were measured beside it (columns of the evidence table) and are reported, not used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

THRESHOLD = 0.8
K_RANGE = (2, 15)
PCA_DIMS = 64
SPLITS = 3
SILHOUETTE_SAMPLE = 3000


@dataclass(frozen=True)
class KRow:
    k: int
    prediction_strength: float  # mean over splits of the worst cluster's co-membership share
    prediction_strength_min: float  # the worst split
    silhouette: float  # cosine, on a sample (reported only)
    knn_consistency: float  # share of 10-NN pairs in the same cluster (reported only)


@dataclass(frozen=True)
class KEstimate:
    k: int
    criterion: str
    threshold: float
    rows: list[KRow]
    reason: str
    n: int
    seconds: float

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _prepare(features: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dims = min(dims, x.shape[1], max(x.shape[0] - 1, 1))
    return PCA(dims, random_state=seed).fit_transform(x).astype(np.float32)


def prediction_strength(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 3) -> float:
    """PS of one random split: the worst test cluster's share of pairs that the training half's centroids keep
    together (clusters with fewer than 2 images are skipped)."""
    from sklearn.cluster import KMeans

    order = rng.permutation(len(x))
    a, b = order[: len(x) // 2], order[len(x) // 2 :]
    seed_a, seed_b = (int(s) for s in rng.integers(0, 2**31 - 1, size=2))
    train = KMeans(k, n_init=n_init, random_state=seed_a).fit(x[a])
    test = KMeans(k, n_init=n_init, random_state=seed_b).fit(x[b])
    predicted = train.predict(x[b])
    shares = []
    for c in range(k):
        members = predicted[test.labels_ == c]
        m = len(members)
        if m < 2:
            continue
        counts = np.bincount(members, minlength=k).astype(np.float64)
        shares.append(float((counts * (counts - 1)).sum() / (m * (m - 1))))
    return min(shares) if shares else 0.0


def estimate_k(
    features: np.ndarray,
    k_range: tuple[int, int] = K_RANGE,
    *,
    threshold: float = THRESHOLD,
    splits: int = SPLITS,
    seed: int = 0,
) -> KEstimate:
    """Prediction strength for every K in `k_range` (inclusive) and the largest K that reaches `threshold`."""
    import time

    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with threadpool_limits(1):  # many small k-means fits: one thread each (no OpenMP barriers on a busy CPU)
        return _estimate(features, k_range, threshold, splits, seed, started)


def _estimate(
    features: np.ndarray, k_range: tuple[int, int], threshold: float, splits: int, seed: int, started: float
) -> KEstimate:
    import time

    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = _prepare(features, PCA_DIMS, seed)
    n = len(x)
    low, high = k_range[0], min(k_range[1], max(n // 10, k_range[0]))  # at least ~5 images per half-cluster
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(n, SILHOUETTE_SAMPLE), replace=False)
    neighbours = _knn(x, 10)
    rows = []
    for k in range(low, high + 1):
        strengths = [prediction_strength(x, k, rng) for _ in range(splits)]
        labels = KMeans(k, n_init=3, random_state=seed).fit_predict(x)
        silhouette = float(silhouette_score(x[sample], labels[sample], metric="cosine")) if k > 1 else 0.0
        rows.append(
            KRow(
                k=k,
                prediction_strength=round(float(np.mean(strengths)), 4),
                prediction_strength_min=round(float(np.min(strengths)), 4),
                silhouette=round(silhouette, 4),
                knn_consistency=round(float((labels[neighbours] == labels[:, None]).mean()), 4),
            )
        )
    passing = [r.k for r in rows if r.prediction_strength >= threshold and r.k >= 3]
    if passing:
        k, reason = max(passing), f"largest K with prediction strength >= {threshold}"
    else:
        best = max(rows, key=lambda r: r.prediction_strength)
        k, reason = best.k, f"no K >= 3 reached {threshold}: the K with the highest prediction strength"
    return KEstimate(
        k=k,
        criterion="prediction_strength",
        threshold=threshold,
        rows=rows,
        reason=reason,
        n=n,
        seconds=round(time.perf_counter() - started, 1),
    )


def _knn(x: np.ndarray, k: int) -> np.ndarray:
    from training.mining import topk_cosine_neighbours

    return topk_cosine_neighbours(x, min(k, len(x) - 1))


def write_evidence(estimate: KEstimate, run_dir: Path) -> list[Path]:
    """`k_selection.json`, `k_selection.md` (the table) and, when matplotlib is installed, `k_selection.png`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [run_dir / "k_selection.json", run_dir / "k_selection.md"]
    written[0].write_text(json.dumps(estimate.to_dict(), indent=2) + "\n")
    lines = [
        f"# K without labels: {estimate.criterion} (threshold {estimate.threshold})",
        "",
        f"Estimated K = **{estimate.k}** ({estimate.reason}); {estimate.n} images, {estimate.seconds} s.",
        "",
        "| K | prediction strength (mean) | worst split | silhouette (reported) | 10-NN consistency (reported) |",
        "|---|---|---|---|---|",
    ]
    for r in estimate.rows:
        mark = " ←" if r.k == estimate.k else ""
        lines.append(
            f"| {r.k}{mark} | {r.prediction_strength:.3f} | {r.prediction_strength_min:.3f} | {r.silhouette:.3f} "
            f"| {r.knn_consistency:.3f} |"
        )
    written[1].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    ks = [r.k for r in estimate.rows]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(ks, [r.prediction_strength for r in estimate.rows], marker="o", label="prediction strength")
    ax.axhline(estimate.threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {estimate.threshold}")
    ax.axvline(estimate.k, color="tab:red", linewidth=1, label=f"K = {estimate.k}")
    ax.set_xlabel("K")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "k_selection.png")
    plt.close(fig)
    written.append(run_dir / "k_selection.png")
    return written
