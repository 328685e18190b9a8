"""Drift statistics for the evaluation job: cluster distribution, confidence distribution, embeddings, models.

numpy/scipy only (no torch, no scikit-learn), so the monitor runs in the serving image. Every function
takes plain arrays and returns plain floats, so the maths is tested on its own with known answers
(tests/test_drift.py).

Reference data (docs/design.md §2, `deepclust.reference` in the ONNX metadata):
- `cluster_hist`: K numbers (counts or proportions; normalised here) measured at export on the evaluation set;
- `confidence_quantiles`: `{"0.05": q, "0.5": q, "0.95": q, ...}` of the max probability on the same set (the
  export stores 0.01, 0.05, 0.10, ..., 0.95, 0.99). The sample is compared with the piecewise-linear CDF
  *through* the stored quantiles (see `QuantileReference`); `ks_lower_bound` also reports the part of the KS
  statistic that holds for *every* CDF through those points, so a coarse reference cannot fake a drift.

Decisions, each documented where it is made:
- PSI floors proportions at `PSI_EPSILON` = 1e-4 (an empty bin would make PSI infinite); the ceiling for two
  disjoint distributions is then `psi_ceiling()` ≈ 18.4, not infinity.
- Jensen–Shannon divergence in base 2, so it lies in [0, 1]: 0 for identical, 1 for disjoint distributions.
- Chi-square: an observed count in a bin the reference says is impossible (expected 0) rejects outright (p
= 0).
- MMD: biased (V-statistic) MMD² with a FIXED Gaussian kernel on L2-normalised embeddings, on at most
  `MMD_MAX_SAMPLES` rows per side (seeded subsample): fixed so figures are comparable run to run, bounded
  so the O(n²) kernel stays cheap. The biased estimator is ≥ 0 and exactly 0 for identical samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from serving.core.quality import adjusted_rand_index, cluster_accuracy, normalized_mutual_info

PSI_EPSILON = 1e-4
"""Floor for a bin's proportion in PSI. 1e-4 is below any share a real sample of < 10k images can measure,
so it only matters for truly empty bins, where it turns an infinite contribution into a large finite one."""

MMD_MAX_SAMPLES = 500
MMD_BANDWIDTH = 1.0
"""σ of the RBF kernel exp(-‖x−y‖² / (2σ²)) on unit-norm embeddings (squared distances lie in [0, 4])."""


# ------------------------------------------------------------------------------------------ distributions
def normalise(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Counts or weights → proportions (float64, sum 1). Raises on negative, non-finite or all-zero input."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"a distribution must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("a distribution must hold finite, non-negative values")
    total = array.sum()
    if total <= 0:
        raise ValueError("a distribution must not be all zeros")
    return array / total


def _pair(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    e, a = normalise(expected), normalise(actual)
    if e.shape != a.shape:
        raise ValueError(f"distributions differ in length: {e.size} vs {a.size}")
    return e, a


def counts_of(clusters: np.ndarray, k: int) -> np.ndarray:
    """Cluster ids → counts per cluster 0..k-1 (ids outside the range are an error, not silently dropped)."""
    ids = np.asarray(clusters, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= k):
        raise ValueError(f"cluster ids must lie in [0, {k}), got [{ids.min()}, {ids.max()}]")
    return np.bincount(ids, minlength=k).astype(np.int64)


def psi(
    expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray, epsilon: float = PSI_EPSILON
) -> float:
    """Population stability index Σ (a − e) · ln(a / e) over bins, proportions floored at `epsilon`.

    Rule of thumb: < 0.1 stable, 0.1–0.25 moderate shift, > 0.25 significant shift (the alert threshold).
    """
    e, a = _pair(expected, actual)
    e, a = np.maximum(e, epsilon), np.maximum(a, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_ceiling(epsilon: float = PSI_EPSILON) -> float:
    """PSI of two disjoint one-hot distributions under the epsilon floor: the largest value PSI reaches."""
    return float(2.0 * (1.0 - epsilon) * np.log(1.0 / epsilon))


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen–Shannon divergence in bits: 0 for identical, 1 for disjoint distributions (no epsilon
    needed)."""
    p, q = _pair(p, q)
    m = (p + q) / 2.0

    def kl_bits(x: np.ndarray) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log2(x[mask] / m[mask])))

    return float(min(max((kl_bits(p) + kl_bits(q)) / 2.0, 0.0), 1.0))


@dataclass(frozen=True)
class ChiSquareResult:
    statistic: float
    dof: int
    p_value: float
    min_expected: float
    """Below ~5 the chi-square approximation is rough: the report carries it so a reader can judge."""


def chi_square_gof(counts: Sequence[int] | np.ndarray, reference: Sequence[float] | np.ndarray) -> ChiSquareResult:
    """Goodness of fit of observed cluster counts to the reference proportions (Pearson's chi-square).

    Bins that are empty in both are dropped (they carry no information). A count in a bin whose reference
    share is 0 cannot happen under the reference: the test rejects outright (statistic inf, p 0).
    """
    observed = np.asarray(counts, dtype=np.float64)
    proportions = normalise(reference)
    if observed.shape != proportions.shape:
        raise ValueError(f"counts and reference differ in length: {observed.size} vs {proportions.size}")
    if np.any(observed < 0) or observed.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive total")
    n = observed.sum()
    expected = proportions * n
    if np.any((expected == 0) & (observed > 0)):
        return ChiSquareResult(float("inf"), int(np.count_nonzero(expected)) - 1, 0.0, 0.0)
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    if observed.size < 2:
        return ChiSquareResult(0.0, 0, 1.0, float(expected.min()))
    result = stats.chisquare(observed, f_exp=expected)
    return ChiSquareResult(float(result.statistic), int(observed.size - 1), float(result.pvalue), float(expected.min()))


# ------------------------------------------------------------------------------------------- confidence
@dataclass(frozen=True)
class QuantileReference:
    """A reference distribution known only through some quantiles, on a bounded support [low, high].

    The CDF is taken as piecewise linear through the points (low, 0), (q_p, p) …, (high, 1): the max
    probability of a K-way softmax lies in [1/K, 1], so the ends are known exactly and only the shape
    between stored points is assumed (linear = uniform density between neighbouring quantiles).
    """

    levels: np.ndarray  # probabilities, increasing, including 0 and 1
    values: np.ndarray  # quantile values, non-decreasing, values[0] = low, values[-1] = high
    stored_levels: np.ndarray  # the levels that were actually stored (without the 0/1 anchors)

    @classmethod
    def from_quantiles(
        cls, quantiles: Mapping[str, float] | Mapping[float, float], low: float, high: float = 1.0
    ) -> QuantileReference:
        pairs = sorted((float(level), float(value)) for level, value in quantiles.items())
        if not pairs:
            raise ValueError("no reference quantiles")
        levels = np.array([p for p, _ in pairs])
        values = np.array([v for _, v in pairs])
        if np.any((levels <= 0) | (levels >= 1)):
            raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {levels.tolist()}")
        if np.any(np.diff(values) < 0):
            raise ValueError(f"quantile values must be non-decreasing, got {values.tolist()}")
        low = min(low, float(values[0]))
        high = max(high, float(values[-1]))
        return cls(
            levels=np.concatenate([[0.0], levels, [1.0]]),
            values=np.concatenate([[low], values, [high]]),
            stored_levels=levels,
        )

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """F(x): linear between neighbouring stored points; where several levels share one value (e.g. a
        saturated q0.95 = 1.0) the CDF jumps there, from the lowest to the highest of those levels."""
        x = np.asarray(x, dtype=np.float64)
        points, inverse = np.unique(self.values, return_inverse=True)
        lowest = np.full(points.size, np.inf)
        highest = np.zeros(points.size)
        np.minimum.at(lowest, inverse, self.levels)
        np.maximum.at(highest, inverse, self.levels)
        right = np.clip(np.searchsorted(points, x, side="left"), 0, points.size - 1)
        left = np.clip(right - 1, 0, points.size - 1)
        span = points[right] - points[left]
        weight = np.where(span > 0, (x - points[left]) / np.where(span > 0, span, 1.0), 1.0)
        inside = highest[left] + np.clip(weight, 0.0, 1.0) * (lowest[right] - highest[left])
        result = np.where(x == points[right], highest[right], inside)
        result = np.where(x < points[0], 0.0, result)
        return np.where(x >= points[-1], 1.0, result)

    def quantile(self, u: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(u, dtype=np.float64), self.levels, self.values)

    def mean(self) -> float:
        """Mean of the piecewise-linear reference (exact for the assumed shape: trapezoids of the quantile
        function)."""
        return float(np.sum(np.diff(self.levels) * (self.values[1:] + self.values[:-1]) / 2.0))


def _sorted_sample(sample: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("the sample is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError("the sample holds non-finite values")
    return x


def ks_statistic(sample: Sequence[float] | np.ndarray, reference: QuantileReference) -> float:
    """Kolmogorov–Smirnov D = sup |F_n − F_ref| against the piecewise-linear reference CDF.

    F_ref is continuous, so the sup is reached at a sample point, just before or at its step:
    D = max_i max(i/n − F(x_i), F(x_i) − (i−1)/n).
    """
    x = _sorted_sample(sample)
    n = x.size
    f = reference.cdf(x)
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - f), np.max(f - (i - 1) / n), 0.0))


def ks_lower_bound(sample: Sequence[float] | np.ndarray, reference: QuantileReference) -> float:
    """The smallest KS statistic of the sample against ANY CDF through the stored quantiles.

    Every such CDF (continuous at the stored points) equals p at q_p, so D ≥ |F_n(q_p) − p| and ≥
    |F_n(q_p⁻) − p|; between the stored points a CDF can
    follow F_n clamped to [p_i, p_{i+1}], so no more is forced. This half of the statistic owes nothing to
    the linear assumption: when it alone is large, the drift is real whatever the reference's shape between
    quantiles.
    """
    x = _sorted_sample(sample)
    n = x.size
    bound = 0.0
    for level, value in zip(reference.stored_levels, reference.values[1:-1], strict=True):
        at = np.searchsorted(x, value, side="right") / n  # F_n(q)
        before = np.searchsorted(x, value, side="left") / n  # F_n(q⁻)
        bound = max(bound, abs(at - level), abs(before - level))
    return float(bound)


def wasserstein_1(sample: Sequence[float] | np.ndarray, reference: QuantileReference, grid: int = 4000) -> float:
    """Earth mover's distance W1 = ∫₀¹ |Q_n(u) − Q_ref(u)| du between the sample and the reference, by the
    midpoint rule on `grid` levels (error O(1/grid) of the support width; plenty for a monitoring figure)."""
    x = _sorted_sample(sample)
    u = (np.arange(grid) + 0.5) / grid
    empirical = x[np.minimum((u * x.size).astype(np.int64), x.size - 1)]
    return float(np.mean(np.abs(empirical - reference.quantile(u))))


def wasserstein_1_samples(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """W1 between two samples (scipy), for model-to-model or sample-to-sample comparisons."""
    return float(stats.wasserstein_distance(_sorted_sample(a), _sorted_sample(b)))


def mean_confidence(confidence: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(_sorted_sample(confidence)))


def low_confidence_ratio(confidence: Sequence[float] | np.ndarray, threshold: float) -> float:
    """Share of assignments whose confidence is strictly below `threshold`.

    The monitor uses the reference's 5 % quantile (q0.05) as the threshold, so the expected share
    under the reference is that level (5 %), the same for every model and K; see `serving.hosts.monitor`.
    """
    return float(np.mean(_sorted_sample(confidence) < threshold))


# -------------------------------------------------------------------------------------------- embeddings
def _bounded(x: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[0] <= max_samples:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=max_samples, replace=False))]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def mmd_rbf(
    x: np.ndarray,
    y: np.ndarray,
    *,
    bandwidth: float = MMD_BANDWIDTH,
    max_samples: int = MMD_MAX_SAMPLES,
    seed: int = 0,
    normalise_rows: bool = True,
) -> float:
    """Biased MMD² between two embedding samples with a fixed Gaussian kernel (0 for identical samples).

    Rows are L2-normalised first (cosine geometry, as the models' heads use) unless `normalise_rows` is
    False; each side is cut to `max_samples` rows by a seeded subsample so the cost is bounded (≤ 3 · 500²
    kernel entries).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"embeddings must be non-empty [n, D] arrays of one D, got {x.shape} and {y.shape}")
    rng = np.random.default_rng(seed)
    x, y = _bounded(x, max_samples, rng), _bounded(y, max_samples, rng)
    if normalise_rows:
        x, y = _unit_rows(x), _unit_rows(y)
    gamma = 1.0 / (2.0 * bandwidth**2)

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
        sq = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
        return float(np.mean(np.exp(-gamma * np.maximum(sq, 0.0))))

    return float(max(kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y), 0.0))


# --------------------------------------------------------------------------------------------- agreement
def model_agreement(clusters_a: np.ndarray, clusters_b: np.ndarray) -> dict[str, float]:
    """How far two models partition the same images alike: NMI, ARI and the Hungarian-matched agreement
    (ACC of one model's clusters against the other's as if they were labels). Cluster ids need not match."""
    a, b = np.asarray(clusters_a), np.asarray(clusters_b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"assignments must be 1-D of one length, got {a.shape} and {b.shape}")
    return {
        "nmi": normalized_mutual_info(a, b),
        "ari": adjusted_rand_index(a, b),
        "matched_agreement": cluster_accuracy(a, b),
        "n": int(a.size),
    }


# ---------------------------------------------------------------------------------------------- sample size
@dataclass(frozen=True)
class SampleSizeCheck:
    """Whether a sample of `n` is large enough for one published statistic, and why (all figures computed).

    `min_n` is the smallest sample for which an *undrifted* sample (drawn from the reference itself) stays at or
    below `bound` with probability `level`; `undrifted_mean` and `undrifted_quantile` are that statistic's mean and
    `level`-quantile at `n` under no drift."""

    statistic: str
    n: int
    min_n: int
    bound: float
    level: float
    undrifted_mean: float
    undrifted_quantile: float
    why: str

    @property
    def sufficient(self) -> bool:
        return self.n >= self.min_n


def undrifted_psi(reference: Sequence[float] | np.ndarray, n: int, *, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """PSI of `draws` samples of `n` assignments drawn from the reference shares themselves (no drift at all):
    the noise floor of the PSI a sample of that size reports."""
    expected = normalise(reference)
    counts = np.random.default_rng(seed).multinomial(n, expected, size=draws)
    e = np.maximum(expected, PSI_EPSILON)
    a = np.maximum(counts / n, PSI_EPSILON)
    return np.sum((a - e) * np.log(a / e), axis=1)


def smallest_n(ok: Callable[[int], bool], n_max: int = 1 << 20) -> int:
    """Smallest n in [1, n_max] with ok(n), for an ok() that turns true as n grows (doubling, then bisection)."""
    high = 1
    while not ok(high):
        if high >= n_max:
            return n_max
        high = min(high * 2, n_max)
    low = high // 2  # ok(low) is false (or low = 0)
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle
    return high


def psi_sample_check(
    reference: Sequence[float] | np.ndarray, n: int, bound: float, level: float = 0.99, seed: int = 0
) -> SampleSizeCheck:
    """PSI of small samples is biased upwards (≈ (K−1)/n, more with empty bins): how large must a sample be so
    that an undrifted one stays below the alert bound?"""
    q = lambda size: float(np.quantile(undrifted_psi(reference, size, seed=seed), level))  # noqa: E731
    min_n = smallest_n(lambda size: q(size) <= bound)
    at_n = undrifted_psi(reference, max(n, 1), seed=seed)
    return SampleSizeCheck(
        "psi",
        n,
        min_n,
        bound,
        level,
        float(at_n.mean()),
        float(np.quantile(at_n, level)),
        f"an undrifted sample of {n} has expected PSI {at_n.mean():.3f} ({level:.0%} quantile "
        f"{np.quantile(at_n, level):.3f}); PSI stays ≤ {bound} without drift in {level:.0%} of samples from "
        f"{min_n} images on",
    )


def chi_square_sample_check(
    reference: Sequence[float] | np.ndarray, n: int, min_expected: float = 5.0
) -> SampleSizeCheck:
    """Pearson's chi-square p-value is trusted when every expected count is ≥ 5 (Cochran's rule)."""
    shares = normalise(reference)
    smallest = float(shares[shares > 0].min())
    min_n = int(math.ceil(min_expected / smallest))
    return SampleSizeCheck(
        "chi2_p_value",
        n,
        min_n,
        min_expected,
        1.0,
        n * smallest,
        n * smallest,
        f"the rarest reference cluster (share {smallest:.3f}) expects {n * smallest:.1f} of {n} images; the "
        f"chi-square p-value needs ≥ {min_expected:g} expected per cluster, i.e. {min_n} images",
    )


def ks_sample_check(n: int, bound: float, level: float = 0.99) -> SampleSizeCheck:
    """The KS statistic of an undrifted sample of n has the exact Kolmogorov distribution (scipy `kstwo`)."""
    min_n = smallest_n(lambda size: float(stats.kstwo.ppf(level, size)) <= bound)
    mean = float(stats.kstwo.mean(max(n, 1)))
    quantile = float(stats.kstwo.ppf(level, max(n, 1)))
    return SampleSizeCheck(
        "confidence_ks",
        n,
        min_n,
        bound,
        level,
        mean,
        quantile,
        f"an undrifted sample of {n} has expected KS {mean:.3f} ({level:.0%} quantile {quantile:.3f}); KS stays "
        f"≤ {bound} without drift in {level:.0%} of samples from {min_n} images on",
    )


def share_sample_check(statistic: str, n: int, p: float, bound: float, level: float = 0.99) -> SampleSizeCheck:
    """A share (e.g. low-confidence assignments, expected p under the reference) is binomial: from which n does
    an undrifted sample stay ≤ bound?"""
    q = lambda size: float(stats.binom.ppf(level, size, p)) / size  # noqa: E731
    min_n = smallest_n(lambda size: q(size) <= bound)
    quantile = q(max(n, 1))
    return SampleSizeCheck(
        statistic,
        n,
        min_n,
        bound,
        level,
        p,
        quantile,
        f"under the reference {p:.0%} of assignments fall in it; a sample of {n} reads up to {quantile:.3f} "
        f"({level:.0%} quantile) without drift; it stays ≤ {bound} from {min_n} images on",
    )


def accuracy_sample_check(n: int, accuracy: float, drop: float, level: float = 0.99) -> SampleSizeCheck:
    """ACC on n labelled images has standard error √(a(1−a)/n): a change of `drop` is noise until
    z_level · SE ≤ drop."""
    a = min(max(accuracy, 0.0), 1.0)
    z = float(stats.norm.ppf(level))
    se = math.sqrt(a * (1 - a) / max(n, 1))
    min_n = max(1, int(math.ceil(z * z * a * (1 - a) / (drop * drop))))
    return SampleSizeCheck(
        "acc",
        n,
        min_n,
        drop,
        level,
        0.0,
        z * se,
        f"ACC {a:.3f} on {n} images has standard error {se:.3f}: a chance drop up to {z * se:.3f} "
        f"({level:.0%}); telling a {drop} drop from noise needs {min_n} images",
    )
