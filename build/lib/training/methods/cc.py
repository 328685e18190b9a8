"""CC — Contrastive Clustering (Li et al., AAAI 2021): instance NT-Xent on projections + cluster contrast on the
columns of the soft assignments, with the balance (entropy) term."""

from __future__ import annotations

import torch

from training.losses.contrastive import cc_cluster_loss, nt_xent
from training.methods.base import Batch, Method, register_method
from training.models.heads import ClusteringModel


@register_method("cc")
class CC(Method):
    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        h1, h2 = batch.features[0], batch.features[1]
        cfg = self.config.method
        instance = nt_xent(model.instance_head(h1), model.instance_head(h2), cfg.instance_temperature)
        cluster = cc_cluster_loss(model.cluster_head(h1), model.cluster_head(h2), cfg.cluster_temperature)
        return {"loss": instance + cluster, "instance": instance.detach(), "cluster": cluster.detach()}
