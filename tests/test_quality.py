"""Our ACC/NMI/ARI (numpy/scipy) against scikit-learn and hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from serving.core.quality import (
    adjusted_rand_index,
    cluster_accuracy,
    evaluate_clustering,
    hungarian_map,
    normalized_mutual_info,
)


def test_perfect_clustering_under_permuted_ids() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([5, 5, 3, 3, 9, 9, 9])
    assert cluster_accuracy(y, pred) == 1.0
    assert normalized_mutual_info(y, pred) == pytest.approx(1.0)
    assert adjusted_rand_index(y, pred) == pytest.approx(1.0)
    assert hungarian_map(y, pred) == {5: 0, 3: 1, 9: 2}


def test_hand_computed_accuracy() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([1, 1, 0, 0, 0, 0])
    # best map: cluster 0 -> class 1 (3 right), cluster 1 -> class 0 (2 right) = 5/6
    assert cluster_accuracy(y, pred) == pytest.approx(5 / 6)


def test_more_clusters_than_classes_counts_unmatched_as_wrong() -> None:
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 2, 2])
    assert cluster_accuracy(y, pred) == pytest.approx(3 / 4)
    assert hungarian_map(y, pred)[1] == 0  # the leftover cluster maps to its majority class


@pytest.mark.parametrize("k_pred", [3, 10, 14])
def test_nmi_and_ari_match_sklearn_on_random_labelings(k_pred: int) -> None:
    rng = np.random.default_rng(k_pred)
    y = rng.integers(0, 10, size=500)
    pred = np.where(rng.random(500) < 0.6, y % k_pred, rng.integers(0, k_pred, size=500))
    assert normalized_mutual_info(y, pred) == pytest.approx(normalized_mutual_info_score(y, pred), abs=1e-10)
    assert adjusted_rand_index(y, pred) == pytest.approx(adjusted_rand_score(y, pred), abs=1e-10)


def test_accuracy_matches_brute_force_over_permutations() -> None:
    import itertools

    rng = np.random.default_rng(7)
    y = rng.integers(0, 4, size=60)
    pred = rng.integers(0, 4, size=60)
    best = max(np.mean(np.array(p)[pred] == y) for p in itertools.permutations(range(4)))
    assert cluster_accuracy(y, pred) == pytest.approx(best)


def test_report_has_sizes_purity_and_confusion() -> None:
    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1])
    report = evaluate_clustering(y, pred)
    assert report.cluster_sizes == {0: 3, 1: 2}
    assert report.cluster_purity[0] == pytest.approx(2 / 3)
    assert report.cluster_purity[1] == pytest.approx(1.0)
    assert report.confusion == [[2, 1], [0, 2]]
    assert report.acc == pytest.approx(4 / 5)
