"""Drift maths against answers known by hand (serving/core/drift.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from serving.core import drift

# ------------------------------------------------------------------------------------------------ PSI / JS


def test_psi_identical_is_zero_and_counts_equal_proportions():
    assert drift.psi([0.1] * 10, [0.1] * 10) == 0.0
    assert drift.psi([10, 30, 60], [1, 3, 6]) == pytest.approx(0.0, abs=1e-15)


def test_psi_of_a_known_shift_by_hand():
    # 50/50 → 60/40: 0.1·ln(0.6/0.5) + (−0.1)·ln(0.4/0.5)
    by_hand = 0.1 * math.log(1.2) - 0.1 * math.log(0.8)
    assert drift.psi([0.5, 0.5], [0.6, 0.4]) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(0.0405465, abs=1e-7)
    # One of ten equal clusters vanishes, the other nine share its mass (the "class removed" case):
    expected, actual = np.full(10, 0.1), np.array([0.0] + [1 / 9] * 9)
    eps = drift.PSI_EPSILON
    by_hand = (eps - 0.1) * math.log(eps / 0.1) + 9 * (1 / 9 - 0.1) * math.log((1 / 9) / 0.1)
    assert drift.psi(expected, actual) == pytest.approx(by_hand, rel=1e-12)
    assert drift.psi(expected, actual) > 0.25  # a vanished cluster is a significant shift


def test_psi_disjoint_reaches_its_documented_ceiling():
    assert drift.psi([1, 0], [0, 1]) == pytest.approx(drift.psi_ceiling())
    assert drift.psi_ceiling() == pytest.approx(2 * (1 - 1e-4) * math.log(1e4))
    # Any other pair stays below the ceiling.
    assert drift.psi([0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]) < drift.psi_ceiling()


def test_js_identical_zero_disjoint_one_known_value():
    assert drift.js_divergence([3, 1, 0], [3, 1, 0]) == 0.0
    assert drift.js_divergence([1, 0, 0], [0, 0, 1]) == pytest.approx(1.0)
    # [1,0] vs [1/2,1/2]: m = [3/4, 1/4]; JS = ½·log2(4/3) + ½·(½·log2(2/3) + ½·log2(2))
    by_hand = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert drift.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(by_hand)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 100), min_size=2, max_size=12).filter(lambda v: sum(v) > 1e-3),
    st.integers(0, 2**31 - 1),
)
def test_psi_and_js_are_non_negative_symmetric_where_they_should_be(weights, seed):
    p = np.asarray(weights)
    q = np.random.default_rng(seed).permutation(p)
    assert drift.psi(p, q) >= -1e-12
    assert drift.psi(p, q) == pytest.approx(drift.psi(q, p), abs=1e-9)  # PSI is symmetric by construction
    js = drift.js_divergence(p, q)
    assert 0.0 <= js <= 1.0
    assert js == pytest.approx(drift.js_divergence(q, p), abs=1e-12)


def test_bad_distributions_are_rejected():
    with pytest.raises(ValueError):
        drift.psi([0, 0], [1, 1])
    with pytest.raises(ValueError):
        drift.psi([1, -1], [1, 1])
    with pytest.raises(ValueError):
        drift.js_divergence([1, 1, 1], [1, 1])
    with pytest.raises(ValueError):
        drift.counts_of(np.array([0, 10]), k=10)


# ------------------------------------------------------------------------------------------------ chi-square


def test_chi_square_matches_the_textbook_formula():
    counts, reference = np.array([60, 40]), [0.5, 0.5]
    result = drift.chi_square_gof(counts, reference)
    assert result.statistic == pytest.approx((10**2 / 50) * 2)  # Σ (o−e)²/e = 4
    assert result.dof == 1
    assert result.p_value == pytest.approx(stats.chi2.sf(4.0, 1))
    assert drift.chi_square_gof([25, 25, 25, 25], [1, 1, 1, 1]).p_value == pytest.approx(1.0)


def test_chi_square_impossible_bin_rejects_and_empty_bins_drop():
    assert drift.chi_square_gof([5, 5, 1], [0.5, 0.5, 0.0]).p_value == 0.0
    kept = drift.chi_square_gof([50, 50, 0], [0.5, 0.5, 0.0])
    assert kept.dof == 1 and kept.p_value == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ confidence
REF = drift.QuantileReference.from_quantiles({"0.05": 0.2, "0.5": 0.6, "0.95": 0.95}, low=0.1)


def test_reference_cdf_goes_through_the_stored_quantiles_and_the_known_ends():
    assert REF.cdf(np.array([0.1, 0.2, 0.6, 0.95, 1.0])) == pytest.approx([0.0, 0.05, 0.5, 0.95, 1.0])
    assert REF.cdf(np.array([0.4])) == pytest.approx([0.05 + 0.45 * 0.5])  # linear between 0.2 and 0.6
    assert REF.quantile(np.array([0.05, 0.5, 0.95])) == pytest.approx([0.2, 0.6, 0.95])
    # A saturated top quantile (q0.95 = 1.0 = the upper end) is a jump, not a ramp to 1 below it.
    saturated = drift.QuantileReference.from_quantiles({"0.05": 0.5, "0.5": 0.9, "0.95": 1.0}, low=0.1)
    assert saturated.cdf(np.array([0.99999]))[0] < 0.95
    assert saturated.cdf(np.array([1.0]))[0] == 1.0


def test_ks_and_wasserstein_zero_for_a_sample_of_the_reference_itself():
    # The reference's own quantile function evaluated on a fine uniform grid IS the reference (up to 1/n).
    n = 4000
    sample = REF.quantile((np.arange(n) + 0.5) / n)
    assert drift.ks_statistic(sample, REF) <= 1 / n + 1e-9
    assert drift.ks_lower_bound(sample, REF) <= 1 / n + 1e-9
    assert drift.wasserstein_1(sample, REF) < 1e-3


def test_ks_and_wasserstein_known_answers_on_simple_samples():
    # A point mass at 1.0: F_n is 0 below 1, where the reference CDF approaches 1 → KS = 1; any CDF through
    # the stored points has F(0.95) = 0.95 while F_n(0.95) = 0 → the bound that holds for every shape is 0.95.
    ones = np.ones(100)
    assert drift.ks_statistic(ones, REF) == pytest.approx(1.0)  # F_ref(1⁻) → 1 on the last ramp, F_n jumps 0→1
    assert drift.ks_lower_bound(ones, REF) == pytest.approx(0.95)
    # W1 to a point mass at 1 = 1 − mean(reference).
    assert drift.wasserstein_1(ones, REF) == pytest.approx(1.0 - REF.mean(), abs=1e-3)
    # Shifting a sample by c moves W1 by exactly c when the whole shift goes one way.
    base = REF.quantile((np.arange(1000) + 0.5) / 1000)
    assert drift.wasserstein_1_samples(base, base - 0.05) == pytest.approx(0.05)
    assert drift.wasserstein_1(base * 0.5, REF) == pytest.approx(0.5 * REF.mean(), rel=0.01)


def test_ks_on_a_sample_agrees_with_scipy_for_a_fully_known_reference():
    # With quantiles every 0.01 of Uniform(0, 1), the piecewise-linear reference IS Uniform(0, 1) exactly.
    quantiles = {f"{p:.2f}": p for p in np.arange(1, 100) / 100}
    uniform = drift.QuantileReference.from_quantiles(quantiles, low=0.0, high=1.0)
    sample = np.random.default_rng(0).beta(2, 1, size=300)
    assert drift.ks_statistic(sample, uniform) == pytest.approx(stats.kstest(sample, "uniform").statistic)


def test_low_confidence_ratio_and_mean():
    conf = np.array([0.1, 0.2, 0.3, 0.9])
    assert drift.low_confidence_ratio(conf, 0.25) == 0.5
    assert drift.low_confidence_ratio(conf, 0.1) == 0.0  # strictly below
    assert drift.mean_confidence(conf) == pytest.approx(0.375)


# ------------------------------------------------------------------------------------------------ MMD /
# agreement


def test_mmd_zero_for_identical_samples_and_grows_with_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16))
    assert drift.mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    same = drift.mmd_rbf(x, rng.normal(size=(200, 16)))
    shifted = drift.mmd_rbf(x, rng.normal(size=(200, 16)) + 0.5)
    assert same < 0.01 < shifted
    # Bounded: a 2,000-row input is cut to MMD_MAX_SAMPLES rows per side by a seeded subsample: the figure equals
    # MMD on exactly those rows (uncapped), and differs from MMD on all 2,000 rows.
    big = rng.normal(size=(2000, 16))
    capped = drift.mmd_rbf(big, big + 0.5)
    pick = np.random.default_rng(0)
    first = np.sort(pick.choice(2000, size=drift.MMD_MAX_SAMPLES, replace=False))
    second = np.sort(pick.choice(2000, size=drift.MMD_MAX_SAMPLES, replace=False))
    assert drift.MMD_MAX_SAMPLES < 2000
    assert capped == drift.mmd_rbf(big[first], big[second] + 0.5, max_samples=10**9)
    assert capped != drift.mmd_rbf(big, big + 0.5, max_samples=10**9)
    # Disjoint one-hot embeddings (orthogonal, |x−y|² = 2): MMD² = 1 + 1 − 2·exp(−1) exactly.
    a = np.tile(np.eye(4)[0], (10, 1))
    b = np.tile(np.eye(4)[1], (10, 1))
    assert drift.mmd_rbf(a, b) == pytest.approx(2 - 2 * math.exp(-1.0))


def test_model_agreement_is_invariant_to_renaming_clusters():
    a = np.repeat(np.arange(5), 20)
    renamed = (a + 2) % 5
    agreement = drift.model_agreement(a, renamed)
    assert agreement["nmi"] == pytest.approx(1.0)
    assert agreement["ari"] == pytest.approx(1.0)
    assert agreement["matched_agreement"] == pytest.approx(1.0)
    noisy = drift.model_agreement(a, np.random.default_rng(0).integers(0, 5, size=a.size))
    assert noisy["ari"] < 0.1 and noisy["nmi"] < 0.2
