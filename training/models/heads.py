"""Heads as small modules (lightly-style): the instance projector and the cluster head of CC."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class InstanceProjector(nn.Module):
    """rep -> rep -> out_dim, L2-normalised: the space where the instance-level contrast happens."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)


class ClusterHead(nn.Module):
    """rep -> rep -> K, softmax: soft cluster assignments whose columns are contrasted in CC."""

    def __init__(self, in_dim: int, k: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or in_dim
        self.k = k
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, k))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=1)


class ClusteringModel(nn.Module):
    """Backbone + instance projector + cluster head(s).

    `cluster_heads` is a list so that SCAN can train several heads at once and keep the best; `head_index` is the
    head used for assignments (CC and CCES have one).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        k: int,
        projection_dim: int = 128,
        num_cluster_heads: int = 1,
        hidden_dim: int | None = None,
        cluster_head: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.k = k
        self.instance_head = InstanceProjector(feature_dim, projection_dim, hidden_dim)
        make = cluster_head or (lambda: ClusterHead(feature_dim, k, hidden_dim))  # a method may bring its own head
        self.cluster_heads = nn.ModuleList(make() for _ in range(num_cluster_heads))
        self.head_index = 0

    @property
    def cluster_head(self) -> ClusterHead:
        return self.cluster_heads[self.head_index]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [N, K], embedding [N, D]) — what the exported graph serves."""
        features = self.backbone(images)
        return self.cluster_head(features), features
