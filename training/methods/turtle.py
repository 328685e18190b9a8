"""TURTLE (Gadetsky, Jiang, Brbic, "Let Go of Your Labels with Unsupervised Transfer", ICML 2024) as a method.

The loss is `training.losses.turtle.turtle_objective` on one batch of cached clean features: label the batch with
the task encoder, fit fresh per-space linear classifiers for M steps on those labels (cold start, first-order
hypergradient: the official defaults), score how well they fit minus gamma times the labelling's entropy. The task
encoder *is* the model's cluster head (`TaskEncoderHead`), so the exported graph serves it like any other head; its
feature pre-processing (per-dimension statistics of the training features) is part of it. No labels enter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from training.data.views import CachedPasses
from training.losses.turtle import TaskEncoder, init_inner, turtle_objective
from training.methods.base import Batch, Method, MethodContext, register_method
from training.models.heads import ClusteringModel

if TYPE_CHECKING:
    from training.config import TrainConfig, TurtleConfig


class TaskEncoderHead(nn.Module):
    """A cluster head over the concatenated spaces: split, pre-process, task encoder -> probabilities [N, K]."""

    def __init__(self, dims: list[int], k: int, *, preprocess: str, combine: str) -> None:
        super().__init__()
        self.dims = list(dims)
        self.k = k
        self.encoder = TaskEncoder(dims, k, combine=combine, preprocess=preprocess)  # type: ignore[arg-type]

    def spaces(self, features: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.preprocess(list(features.float().split(self.dims, dim=1)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.spaces(features))[0]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return torch.log(self(features).clamp_min(1e-12))


@register_method("turtle")
class Turtle(Method):
    """TURTLE's bilevel objective, one outer step per training batch."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.cfg: TurtleConfig = config.method  # type: ignore[assignment]
        if not config.model.cached_features:
            raise ValueError("turtle trains on cached frozen features: set model.cached_features=true")

    @classmethod
    def cluster_head(cls, config: TrainConfig, dims: list[int]) -> Callable[[], nn.Module]:
        cfg: TurtleConfig = config.method  # type: ignore[assignment]
        return lambda: TaskEncoderHead(dims, config.model.k, preprocess=cfg.preprocess, combine=cfg.combine)

    def train_data(self, ctx: MethodContext) -> Dataset:
        """The clean cached features (one view per sample); the encoder's pre-processing is fitted on them."""
        features = ctx.passes(ctx.train_set, ["clean"])[0]
        tensor = torch.from_numpy(features)
        for head in ctx.model.cluster_heads:
            head.encoder.fit_preprocessing(list(tensor.split(head.dims, dim=1)))
        return CachedPasses([features], ctx.train_labels, num_views=1)

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        head: TaskEncoderHead = model.cluster_head  # type: ignore[assignment]
        spaces = head.spaces(batch.features[0])
        inner = init_inner(head.dims, head.k, dtype=spaces[0].dtype)
        with torch.autocast(device_type=spaces[0].device.type, enabled=False):
            result, _ = turtle_objective(
                head.encoder,
                spaces,
                inner,
                gamma=self.cfg.gamma,
                inner_steps=self.cfg.inner_steps,
                inner_lr=self.cfg.inner_lr,
            )
        return {
            "loss": result.total,
            "prediction_error": result.prediction_error.detach(),
            "entropy": result.entropy.detach(),
        }
