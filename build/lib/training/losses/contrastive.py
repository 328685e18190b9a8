"""Contrastive losses of CC (Li et al., AAAI 2021), written for clarity and checked against loop versions in tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Instance-level NT-Xent over 2N embeddings: each sample's positive is its other view, the 2N-2 others negatives.

    z1, z2: [N, D] (normalised here, so callers may pass raw projections). Mean over the 2N anchors.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def entropy_of_mean(p: torch.Tensor) -> torch.Tensor:
    """H(mean_i p_i): high when the batch is spread over all clusters (natural log)."""
    mean = p.mean(dim=0)
    return -(mean * torch.log(mean.clamp_min(1e-12))).sum()


def balance_term(p: torch.Tensor) -> torch.Tensor:
    """log K - H(mean p) >= 0: CC's guard against putting everything into one cluster (0 when perfectly balanced)."""
    return math.log(p.shape[1]) - entropy_of_mean(p)


def cluster_contrastive(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cluster-level contrast: NT-Xent over the K columns of the two views' soft assignments (cosine similarity)."""
    return nt_xent(p1.t(), p2.t(), temperature)


def cc_cluster_loss(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CC's full cluster loss: column contrast + the balance term of each view."""
    return cluster_contrastive(p1, p2, temperature) + balance_term(p1) + balance_term(p2)
