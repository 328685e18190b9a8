"""Clustering quality: ACC (Hungarian), NMI, ARI, purity and confusion matrix.

numpy/scipy only, so training, the labeller and the evaluation job share one implementation
without importing torch or scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


def _as_labels(values: np.ndarray | list[int]) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def contingency(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts table [n_clusters, n_classes] with the sorted unique cluster and class values."""
    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.shape} vs {y_pred.shape}")
    classes, true_idx = np.unique(y_true, return_inverse=True)
    clusters, pred_idx = np.unique(y_pred, return_inverse=True)
    table = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(table, (pred_idx, true_idx), 1)
    return table, clusters, classes


def hungarian_map(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """Best one-to-one map cluster -> class (clusters left over when K > classes map to their majority class)."""
    table, clusters, classes = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping = {int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols, strict=True)}
    for r, cluster in enumerate(clusters):
        mapping.setdefault(int(cluster), int(classes[int(np.argmax(table[r]))]))
    return mapping


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ACC under the best one-to-one assignment of clusters to classes (unmatched clusters count as wrong)."""
    table, _, _ = contingency(y_true, y_pred)
    if table.size == 0:
        return 0.0
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def _entropy_from_counts(counts: np.ndarray) -> float:
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """NMI with the arithmetic-mean normalisation (scikit-learn's default)."""
    table, _, _ = contingency(y_true, y_pred)
    n = table.sum()
    if n == 0:
        return 0.0
    h_true = _entropy_from_counts(table.sum(axis=0))
    h_pred = _entropy_from_counts(table.sum(axis=1))
    if h_true == 0.0 and h_pred == 0.0:
        return 1.0
    nz = table > 0
    joint = table[nz] / n
    outer = np.outer(table.sum(axis=1), table.sum(axis=0))[nz] / (n * n)
    mi = float((joint * (np.log(joint) - np.log(outer))).sum())
    denominator = (h_true + h_pred) / 2.0
    return float(max(mi, 0.0) / denominator) if denominator > 0 else 0.0


def _pairs(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x * (x - 1) / 2.0


def adjusted_rand_index(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ARI (Hubert & Arabie): 1 for identical partitions, ~0 for random ones."""
    table, _, _ = contingency(y_true, y_pred)
    n = table.sum()
    if n < 2:
        return 1.0
    sum_cells = _pairs(table).sum()
    sum_rows = _pairs(table.sum(axis=1)).sum()
    sum_cols = _pairs(table.sum(axis=0)).sum()
    expected = sum_rows * sum_cols / _pairs(np.array(n))
    maximum = (sum_rows + sum_cols) / 2.0
    if maximum == expected:
        return 1.0
    return float((sum_cells - expected) / (maximum - expected))


@dataclass
class ClusteringReport:
    """Everything we report about one clustering against ground truth."""

    acc: float
    nmi: float
    ari: float
    n: int
    cluster_sizes: dict[int, int] = field(default_factory=dict)
    cluster_purity: dict[int, float] = field(default_factory=dict)
    mapping: dict[int, int] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {"acc": self.acc, "nmi": self.nmi, "ari": self.ari, "n": self.n}


def evaluate_clustering(y_true: np.ndarray, y_pred: np.ndarray) -> ClusteringReport:
    """ACC/NMI/ARI plus per-cluster size and purity and the confusion matrix (rows: clusters, cols: classes)."""
    table, clusters, _ = contingency(y_true, y_pred)
    sizes = table.sum(axis=1)
    return ClusteringReport(
        acc=cluster_accuracy(y_true, y_pred),
        nmi=normalized_mutual_info(y_true, y_pred),
        ari=adjusted_rand_index(y_true, y_pred),
        n=int(table.sum()),
        cluster_sizes={int(c): int(s) for c, s in zip(clusters, sizes, strict=True)},
        cluster_purity={int(c): float(table[i].max() / sizes[i]) if sizes[i] else 0.0 for i, c in enumerate(clusters)},
        mapping=hungarian_map(y_true, y_pred),
        confusion=table.tolist(),
    )
