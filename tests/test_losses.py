"""CC losses against direct loop computations and known invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses.contrastive import balance_term, cc_cluster_loss, cluster_contrastive, entropy_of_mean, nt_xent


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """The SimCLR definition written out anchor by anchor."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(z[i] @ z[positive]) / tau)
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(nt_xent_loop(z1, z2, tau), rel=1e-5)


def test_cluster_contrast_matches_loop_on_columns() -> None:
    g = torch.Generator().manual_seed(1)
    p1 = torch.randn(16, 4, generator=g).softmax(1)
    p2 = torch.randn(16, 4, generator=g).softmax(1)
    assert float(cluster_contrastive(p1, p2, 1.0)) == pytest.approx(nt_xent_loop(p1.t(), p2.t(), 1.0), rel=1e-5)


def test_balance_term_is_zero_when_balanced_and_log_k_when_collapsed() -> None:
    k = 5
    balanced = torch.eye(k).repeat(3, 1)
    collapsed = torch.zeros(15, k)
    collapsed[:, 0] = 1
    assert float(balance_term(balanced)) == pytest.approx(0.0, abs=1e-6)
    assert float(balance_term(collapsed)) == pytest.approx(math.log(k), rel=1e-5)
    assert float(entropy_of_mean(balanced)) == pytest.approx(math.log(k), rel=1e-6)


def test_cluster_loss_invariant_to_cluster_permutation_and_view_swap() -> None:
    g = torch.Generator().manual_seed(2)
    p1 = torch.randn(32, 6, generator=g).softmax(1)
    p2 = torch.randn(32, 6, generator=g).softmax(1)
    perm = torch.randperm(6, generator=g)
    base = float(cc_cluster_loss(p1, p2))
    assert float(cc_cluster_loss(p1[:, perm], p2[:, perm])) == pytest.approx(base, rel=1e-6)
    assert float(cc_cluster_loss(p2, p1)) == pytest.approx(base, rel=1e-6)


def test_instance_loss_invariant_to_view_swap_and_sample_order() -> None:
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    perm = torch.randperm(9, generator=g)
    base = float(nt_xent(z1, z2, 0.5))
    assert float(nt_xent(z2, z1, 0.5)) == pytest.approx(base, rel=1e-6)
    assert float(nt_xent(z1[perm], z2[perm], 0.5)) == pytest.approx(base, rel=1e-6)


def test_aligned_views_give_lower_instance_loss_than_random_ones() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(32, 16, generator=g)
    assert float(nt_xent(z, z + 0.01 * torch.randn(32, 16, generator=g), 0.5)) < float(
        nt_xent(z, torch.randn(32, 16, generator=g), 0.5)
    )
