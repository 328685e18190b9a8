"""The number of clusters K, estimated without labels on frozen features: prediction strength against a null.

Criterion: **null-calibrated prediction strength** — the prediction strength of Tibshirani & Walther ("Cluster
validation by prediction strength", JCGS 2005) measured against its value on structureless data of the same shape,
the calibration principle of Clest (Dudoit & Fridlyand, Genome Biology 2002) and of the gap statistic. On the
L2-normalised frozen features reduced by PCA: split the images into two random halves A and B; cluster each half with
k-means into K groups; assign B's images to A's centroids; for every cluster of B, the share of its pairs that A's
centroids also put together; PS(K) is the *worst* cluster's share, averaged over random splits. The same is measured
on null data: Gaussian samples with the features' mean and covariance (one cloud, no clusters, the same elongation).
The estimate is **the K with the largest excess PS(K) - PS_null(K)**.

Why (docs/design.md §5, "K without labels"): the raw prediction strength with the paper's 0.8 threshold rewards any
partition a single elongated cloud also reproduces (K = 2 cuts a cloud along its longest axis just as reproducibly)
and so under-estimated K on every folder measured (2 on sklearn digits, 2 on 6 CIFAR classes). Subtracting what a
structureless cloud of the same covariance reproduces keeps only the reproducibility that comes from cluster
structure, with no threshold to set: the comparison is between two numbers on the same scale. The splits and null
samples are shared across K (common random numbers), so the K's are compared on the same draws. When the best excess
is within two standard errors of zero the folder shows no cluster structure at any K: the estimate is still the
argmax, and `structure` says so. Silhouette, 10-NN consistency and the raw PS with its 0.8 rule are reported beside
it (columns of the evidence table), not used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

THRESHOLD = 0.8  # the paper's rule, reported beside the criterion (not used)
K_RANGE = (2, 15)
PCA_DIMS = 64
SPLITS = 5  # random half-splits of the data, and as many null samples
MAX_POINTS = 4000  # a random subset beyond this: >= 130 images per half-cluster at K = 15, and seconds per K
SILHOUETTE_SAMPLE = 3000
SIGNIFICANCE_SE = 2.0  # "structure found" when the best excess is more than two standard errors above zero


@dataclass(frozen=True)
class KRow:
    k: int
    excess: float  # prediction_strength - null_prediction_strength: the criterion
    excess_se: float  # standard error of the excess over the splits
    prediction_strength: float  # mean over splits of the worst cluster's co-membership share
    null_prediction_strength: float  # the same on Gaussian samples of the features' mean and covariance
    prediction_strength_min: float  # the worst split
    silhouette: float  # cosine, on a sample (reported only)
    knn_consistency: float  # share of 10-NN pairs in the same cluster (reported only)


@dataclass(frozen=True)
class KEstimate:
    k: int
    criterion: str
    threshold: float  # the raw PS rule's threshold, reported only
    rows: list[KRow]
    reason: str
    n: int
    seconds: float
    structure: bool = True  # the best excess is more than SIGNIFICANCE_SE standard errors above zero
    k_raw_ps_rule: int | None = None  # what the old rule (largest K with PS >= 0.8) would say, reported only

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def _prepare(features: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dims = min(dims, x.shape[1], max(x.shape[0] - 1, 1))
    return PCA(dims, random_state=seed).fit_transform(x).astype(np.float32)


def prediction_strength(
    x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 3, order: np.ndarray | None = None
) -> float:
    """PS of one random split (or of the split `order` gives): the worst test cluster's share of pairs that the
    training half's centroids keep together (clusters with fewer than 2 images are skipped)."""
    from sklearn.cluster import KMeans

    order = rng.permutation(len(x)) if order is None else order
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


def null_samples(x: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` Gaussian clouds of x's size with x's mean and covariance: data of the same shape, without clusters."""
    mean, cov = x.mean(axis=0), np.cov(x, rowvar=False)
    return [rng.multivariate_normal(mean, cov, size=len(x)).astype(np.float32) for _ in range(count)]


def estimate_k(
    features: np.ndarray,
    k_range: tuple[int, int] = K_RANGE,
    *,
    splits: int = SPLITS,
    seed: int = 0,
    max_points: int = MAX_POINTS,
) -> KEstimate:
    """Null-calibrated prediction strength for every K in `k_range` (inclusive); the K with the largest excess."""
    import time

    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    with threadpool_limits(1):  # many small k-means fits: one thread each (no OpenMP barriers on a busy CPU)
        return _estimate(features, k_range, splits, seed, max_points, started)


def _estimate(
    features: np.ndarray, k_range: tuple[int, int], splits: int, seed: int, max_points: int, started: float
) -> KEstimate:
    import time

    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    x = _prepare(features, PCA_DIMS, seed)
    if len(x) > max_points:
        x = x[np.sort(rng.choice(len(x), size=max_points, replace=False))]
    n = len(x)
    low, high = k_range[0], min(k_range[1], max(n // 10, k_range[0]))  # at least ~5 images per half-cluster
    orders = [rng.permutation(n) for _ in range(splits)]  # the same splits and null samples for every K
    nulls = null_samples(x, splits, rng)
    sample = rng.choice(n, size=min(n, SILHOUETTE_SAMPLE), replace=False)
    neighbours = _knn(x, 10)
    rows = []
    for k in range(low, high + 1):
        fit_rng = np.random.default_rng([seed, k])
        data = np.array([prediction_strength(x, k, fit_rng, order=o) for o in orders])
        null = np.array([prediction_strength(z, k, fit_rng, order=o) for z, o in zip(nulls, orders, strict=True)])
        excess = data - null
        labels = KMeans(k, n_init=3, random_state=seed).fit_predict(x)
        silhouette = float(silhouette_score(x[sample], labels[sample], metric="cosine")) if k > 1 else 0.0
        rows.append(
            KRow(
                k=k,
                excess=round(float(excess.mean()), 4),
                excess_se=round(float(excess.std(ddof=1) / np.sqrt(len(excess))) if len(excess) > 1 else 0.0, 4),
                prediction_strength=round(float(data.mean()), 4),
                null_prediction_strength=round(float(null.mean()), 4),
                prediction_strength_min=round(float(data.min()), 4),
                silhouette=round(silhouette, 4),
                knn_consistency=round(float((labels[neighbours] == labels[:, None]).mean()), 4),
            )
        )
    best = max(rows, key=lambda r: r.excess)  # ties: the smaller K
    structure = best.excess > SIGNIFICANCE_SE * max(best.excess_se, 1e-6)
    if structure:
        reason = (
            f"largest excess of prediction strength over structureless data of the same covariance "
            f"({best.prediction_strength:.3f} vs {best.null_prediction_strength:.3f})"
        )
    else:
        reason = (
            f"no cluster structure found: the best excess ({best.excess:.3f}) is within {SIGNIFICANCE_SE:g} standard "
            f"errors ({best.excess_se:.3f}) of zero; K = its argmax, weakly supported"
        )
    passing = [r.k for r in rows if r.prediction_strength >= THRESHOLD and r.k >= 3]
    raw = max(passing) if passing else max(rows, key=lambda r: r.prediction_strength).k
    return KEstimate(
        k=best.k,
        criterion="null_calibrated_prediction_strength",
        threshold=THRESHOLD,
        rows=rows,
        reason=reason,
        n=n,
        seconds=round(time.perf_counter() - started, 1),
        structure=bool(structure),
        k_raw_ps_rule=raw,
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
        "# K without labels: prediction strength against structureless data of the same covariance",
        "",
        f"Estimated K = **{estimate.k}** ({estimate.reason}); {estimate.n} images, {estimate.seconds} s.",
        f"The raw prediction-strength rule (largest K with PS >= {estimate.threshold}) would say "
        f"{estimate.k_raw_ps_rule} (reported, not used).",
        "",
        "| K | excess (PS - null PS) | ± s.e. | prediction strength | null PS | worst split | silhouette (reported) "
        "| 10-NN consistency (reported) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in estimate.rows:
        mark = " ←" if r.k == estimate.k else ""
        lines.append(
            f"| {r.k}{mark} | {r.excess:.3f} | {r.excess_se:.3f} | {r.prediction_strength:.3f} "
            f"| {r.null_prediction_strength:.3f} | {r.prediction_strength_min:.3f} | {r.silhouette:.3f} "
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
    ax.plot(ks, [r.null_prediction_strength for r in estimate.rows], marker=".", label="null (same covariance)")
    ax.plot(ks, [r.excess for r in estimate.rows], marker="s", label="excess (the criterion)")
    ax.axvline(estimate.k, color="tab:red", linewidth=1, label=f"K = {estimate.k}")
    ax.set_xlabel("K")
    ax.set_ylim(-0.3, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "k_selection.png")
    plt.close(fig)
    written.append(run_dir / "k_selection.png")
    return written
