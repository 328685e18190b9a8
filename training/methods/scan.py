"""SCAN (Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels", ECCV 2020), from the paper.

One registered method, `scan`, whose stages the one trainer runs in order under one run directory:

    run_dir/
      config.yaml            the run's config
      pretext/final.pt       SimCLR (skipped for a pretrained, frozen backbone)
      neighbours.npz         top-k neighbour indices + label agreement (plain numpy)
      scan/final.pt          SCAN clustering, `head_index` = lowest-loss head
      selflabel/final.pt     self-labelled model (or selflabel/stopped.json when the collapse guard stopped it)
      final.pt, metrics.json the result (a copy of the last finished stage), for export/evaluate

- pretext (`SimCLRPretext`): NT-Xent (tau = 0.1) between two SimCLR views on `model.instance_head`.
- mine: exact top-k cosine neighbours of the training set (`training.mining`).
- scan (`SCANClustering`): a sample and one of its mined neighbours should get the same cluster,
  loss = -mean log <p(x), p(n)> - lambda * H(mean p), for every head of `model.cluster_heads` at once; the head with
  the lowest loss becomes `model.head_index` (saved in the checkpoint; the exporter serves that head).
- selflabel (`SelfLabel`): confident weak-view predictions (max p > threshold) become pseudo-labels for a strong view
  (RandAugment + Cutout); cross-entropy weighted by the inverse pseudo-label frequency. A guard stops the stage with a
  report when one cluster takes most samples (the failure mode of self-training).

A finished stage is not trained again, so re-running the same command only runs what is missing; an interrupted
stage resumes from its own `last.pt`. Views follow `training.data.views` on every data path.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.data.views import BatchedRows, Clean, Recipe, Strong, random_rows
from training.losses.contrastive import entropy_of_mean, nt_xent
from training.methods.base import Batch, Method, MethodContext, Stage, StepStage, StopStage, register_method
from training.mining import NEIGHBOURS_FILE, Neighbours, mine
from training.models.heads import ClusteringModel

if TYPE_CHECKING:
    from training.config import SCANConfig, TrainConfig

log = logging.getLogger("deepclust.scan")

_EPS = 1e-7


# --------------------------------------------------------------------------------------------------- losses
def scan_consistency(p_anchor: torch.Tensor, p_neighbour: torch.Tensor) -> torch.Tensor:
    """-mean_i log <p(x_i), p(n_i)>: small when a sample and its neighbour agree confidently."""
    dot = (p_anchor * p_neighbour).sum(dim=1)
    return -torch.log(dot.clamp_min(_EPS)).mean()


def scan_loss(
    p_anchor: torch.Tensor, p_neighbour: torch.Tensor, entropy_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, consistency, entropy) with total = consistency - entropy_weight * H(mean p_anchor).

    Maximising the entropy of the mean assignment spreads samples over the clusters (no trivial one-cluster
    solution); with over-clustering the same term spreads them over all K heads' outputs.
    """
    consistency = scan_consistency(p_anchor, p_neighbour)
    entropy = entropy_of_mean(p_anchor)
    return consistency - entropy_weight * entropy, consistency, entropy


def select_head(head_losses: Sequence[float]) -> int:
    """The head kept after SCAN: the one with the lowest loss (first one on ties)."""
    if not len(head_losses):
        raise ValueError("no head losses")
    return int(np.argmin(np.asarray(head_losses, dtype=np.float64)))


def confident_pseudo_labels(p_weak: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): samples whose weak-view max probability exceeds `threshold`, and their argmax."""
    confidence, targets = p_weak.max(dim=1)
    return confidence > threshold, targets


def inverse_frequency_weights(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Class weights 1 / count of each pseudo-label (0 for absent ones), scaled so present classes average 1.

    Without the weighting, the clusters that are confident first (usually the big ones) take over.
    """
    counts = torch.bincount(targets, minlength=k).float()
    present = counts > 0
    weights = torch.zeros(k, device=targets.device)
    weights[present] = 1.0 / counts[present]
    if present.any():
        weights = weights * (present.sum() / weights[present].sum())
    return weights


def selflabel_loss(
    logits_strong: torch.Tensor, p_weak: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mask): weighted cross-entropy of the strong view against the confident weak-view pseudo-labels."""
    mask, targets = confident_pseudo_labels(p_weak.detach(), threshold)
    if not mask.any():
        return logits_strong.sum() * 0.0, mask
    chosen = targets[mask]
    weights = inverse_frequency_weights(chosen, logits_strong.shape[1])
    loss = F.cross_entropy(logits_strong[mask].float(), chosen, weight=weights.float(), reduction="mean")
    return loss, mask


class CollapseError(StopStage):
    """Self-labelling collapsed: one cluster took more than the allowed share of the samples."""

    def __init__(self, sizes: list[int], share: float, limit: float, where: str) -> None:
        self.sizes, self.share, self.limit, self.where = sizes, share, limit, where
        super().__init__(
            f"collapse during {where}: cluster {int(np.argmax(sizes))} holds {share:.1%} of the samples "
            f"(limit {limit:.0%}); cluster sizes {sizes}"
        )

    def report(self) -> dict[str, Any]:
        return {"where": self.where, "share": self.share, "limit": self.limit, "cluster_sizes": self.sizes}


def check_collapse(assignments: np.ndarray | torch.Tensor, k: int, limit: float, where: str) -> list[int]:
    """Raise `CollapseError` when the largest cluster holds more than `limit` of `assignments`; return the sizes."""
    sizes = np.bincount(np.asarray(assignments, dtype=np.int64).ravel(), minlength=k).tolist()
    total = max(sum(sizes), 1)
    share = max(sizes) / total
    if share > limit:
        raise CollapseError(sizes, share, limit, where)
    return sizes


# --------------------------------------------------------------------------------------------------- datasets
class NeighbourPairs(BatchedRows):
    """Item i -> (view of sample i, view of a random one of its mined neighbours, label, i).

    `passes` given: views are rows of cached feature passes (a random pass per side), read a batch at a time.
    Otherwise `base` is an image dataset and `transforms[0]` / `transforms[1]` make the anchor's and the neighbour's
    view, one sample at a time. `include_self`: the partner is drawn among the neighbours and the sample itself (two
    augmentations of one image), as officially.
    """

    def __init__(
        self,
        neighbours: np.ndarray,
        labels: np.ndarray,
        *,
        passes: Sequence[np.ndarray] | None = None,
        base: Dataset | None = None,
        transforms: Sequence[Callable[..., torch.Tensor]] = (),
        include_self: bool = False,
    ) -> None:
        neighbours = np.asarray(neighbours)
        if include_self:  # official SCAN: the partner is drawn among the k neighbours *and* the sample itself
            neighbours = np.concatenate([np.arange(len(neighbours))[:, None], neighbours], axis=1)
        self.neighbours = torch.as_tensor(neighbours, dtype=torch.long)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.passes = [torch.from_numpy(p) for p in passes] if passes is not None else None
        self.base, self.transforms = base, list(transforms)

    @property
    def batchable(self) -> bool:
        return self.passes is not None

    def __len__(self) -> int:
        return int(self.neighbours.shape[0])

    def rows(self, index: torch.Tensor) -> tuple:
        assert self.passes is not None, "image datasets are read one sample at a time"
        partner = self.neighbours[index, torch.randint(self.neighbours.shape[1], (len(index),))]
        return random_rows(self.passes, index), random_rows(self.passes, partner), self.labels[index], index

    def __getitem__(self, index: int) -> tuple:
        if self.passes is not None:
            return super().__getitem__(index)
        neighbour = int(self.neighbours[index, random.randrange(self.neighbours.shape[1])])
        image, _ = self.base[index]  # type: ignore[index]
        partner, _ = self.base[neighbour]  # type: ignore[index]
        return self.transforms[0](image), self.transforms[1](partner), int(self.labels[index]), index


class WeakStrongPasses(BatchedRows):
    """Item i -> (weak view, strong view, label, i) from cached passes (a random pass of each list)."""

    def __init__(self, weak: list[np.ndarray], strong: list[np.ndarray], labels: np.ndarray) -> None:
        self.weak = [torch.from_numpy(p) for p in weak]
        self.strong = [torch.from_numpy(p) for p in strong]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return int(self.weak[0].shape[0])

    def rows(self, index: torch.Tensor) -> tuple:
        return random_rows(self.weak, index), random_rows(self.strong, index), self.labels[index], index


# --------------------------------------------------------------------------------------------------- stages
def runs_pretext(config: TrainConfig) -> bool:
    """SimCLR pretext unless the backbone is pretrained and frozen (`pretext: auto`)."""
    s: SCANConfig = config.method  # type: ignore[assignment]
    m = config.model
    if s.pretext == "auto":
        return not (m.pretrained and m.freeze_backbone)
    if s.pretext == "simclr" and m.cached_features:
        raise ValueError("pretext=simclr cannot train a frozen, cached backbone; use pretext=skip or auto")
    return s.pretext == "simclr"


class SimCLRPretext(Method):
    """SCAN's pretext task: NT-Xent on the instance projection of two SimCLR views (tau from the config).

    SimCLR's CIFAR augmentations are CC's with strength 0.5 (ColorJitter 0.4/0.4/0.4/0.1), so the base views apply.
    """

    name = "scan/pretext"

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        tau = self.config.method.pretext_temperature  # type: ignore[union-attr]
        h1, h2 = batch.features[0], batch.features[1]
        loss = nt_xent(model.instance_head(h1), model.instance_head(h2), tau)
        return {"loss": loss}


def strong_view(config: TrainConfig) -> Strong:
    """SCAN's one strong-augmentation recipe (clustering and self-labelling), on every data path."""
    return Strong(config.data.image_size, config.method.cutout_fraction)  # type: ignore[union-attr]


class SCANClustering(Method):
    """SCAN loss on (sample, neighbour) pairs under the strong view for every cluster head; after each epoch the
    head with the lowest SCAN loss on a validation pass (clean views of the training set and their mined neighbours,
    no gradient) becomes `model.head_index` (official: the lowest loss on its validation split's neighbours)."""

    name = "scan/scan"

    def __init__(self, config: TrainConfig, neighbours: np.ndarray | None = None) -> None:
        super().__init__(config)
        self.neighbours = neighbours

    def views(self) -> list[Recipe]:
        strong = strong_view(self.config)
        return [strong, strong]

    def train_data(self, ctx: MethodContext) -> Dataset:
        if self.neighbours is None:
            raise ValueError("SCAN needs mined neighbours (the mine stage runs first)")
        include_self = self.config.method.neighbours_include_self  # type: ignore[union-attr]
        if ctx.cached:
            names = self.config.method.strong_passes  # type: ignore[union-attr]
            passes = ctx.passes(ctx.train_set, names, strong_view(self.config))
            return NeighbourPairs(self.neighbours, ctx.train_labels, passes=passes, include_self=include_self)
        transforms = ctx.transforms(self.views())
        return NeighbourPairs(
            self.neighbours, ctx.train_labels, base=ctx.train_set, transforms=transforms, include_self=include_self
        )

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config.method
        h_anchor, h_neighbour = batch.features[0], batch.features[1]
        out: dict[str, torch.Tensor] = {}
        total = h_anchor.new_zeros((), dtype=torch.float32)
        for index, head in enumerate(model.cluster_heads):
            p_anchor = head(h_anchor).float()
            p_neighbour = head(h_neighbour).float()
            loss, consistency, entropy = scan_loss(p_anchor, p_neighbour, cfg.entropy_weight)  # type: ignore[union-attr]
            total = total + loss
            out[f"head{index}"] = loss.detach()
            if index == 0:
                out["consistency0"], out["entropy0"] = consistency.detach(), entropy.detach()
        out["loss"] = total
        return out

    @torch.inference_mode()
    def validation_losses(self, ctx: MethodContext) -> list[float]:
        """SCAN loss of every head on clean views: each training sample against each of its mined neighbours."""
        assert self.neighbours is not None
        _, features, _ = ctx.predict(ctx.train_set)
        embedding = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(ctx.device)
        neighbours = torch.from_numpy(self.neighbours).to(ctx.device)
        weight = self.config.method.entropy_weight  # type: ignore[union-attr]
        ctx.model.eval()
        losses = []
        for head in ctx.model.cluster_heads:
            p = torch.cat([head(chunk).float() for chunk in embedding.split(4096)])
            consistency = torch.stack([scan_consistency(p, p[neighbours[:, j]]) for j in range(neighbours.shape[1])])
            losses.append(float(consistency.mean() - weight * entropy_of_mean(p)))
        return losses

    def on_epoch_end(self, ctx: MethodContext, epoch: int, losses: dict[str, float]) -> None:
        head_losses = self.validation_losses(ctx)
        ctx.model.head_index = select_head(head_losses)
        losses.update({f"val_head{i}": round(v, 5) for i, v in enumerate(head_losses)})
        losses["head_index"] = ctx.model.head_index


class SelfLabel(Method):
    """Self-labelling of the kept head on (weak, strong) views, with the collapse guard."""

    name = "scan/selflabel"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self._assignments: list[torch.Tensor] = []
        self._checked_start = False

    def views(self) -> list[Recipe]:
        """Weak: the plain evaluation view (official); strong: SCAN's strong augmentation."""
        return [Clean(self.config.data.image_size), strong_view(self.config)]

    def train_data(self, ctx: MethodContext) -> Dataset | None:
        if not ctx.cached:
            return None  # the trainer's views of `views()` on the configured path
        names = self.config.method.strong_passes  # type: ignore[union-attr]
        weak = ctx.passes(ctx.train_set, ["clean"])
        return WeakStrongPasses(weak, ctx.passes(ctx.train_set, names, strong_view(self.config)), ctx.train_labels)

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        threshold = self.config.method.selflabel_threshold  # type: ignore[union-attr]
        head = model.cluster_head
        with torch.no_grad():
            p_weak = head(batch.features[0]).float()
        self._assignments.append(p_weak.argmax(dim=1).cpu())
        loss, mask = selflabel_loss(head.logits(batch.features[1]), p_weak, threshold)
        return {"loss": loss, "confident": mask.float().mean().detach()}

    def on_epoch_start(self, ctx: MethodContext, epoch: int) -> None:
        self._assignments = []
        if not self._checked_start:  # first epoch of this process: check the model we start from
            self._checked_start = True
            probabilities, _, _ = ctx.predict(None)
            self.guard(probabilities.argmax(axis=1), ctx.model.k, f"selflabel start (epoch {epoch})")

    def on_epoch_end(self, ctx: MethodContext, epoch: int, losses: dict[str, float]) -> None:
        if self._assignments:
            sizes = self.guard(torch.cat(self._assignments).numpy(), ctx.model.k, f"selflabel epoch {epoch + 1}")
            losses["largest_share"] = round(max(sizes) / max(sum(sizes), 1), 4)

    def guard(self, assignments: np.ndarray, k: int, where: str) -> list[int]:
        return check_collapse(assignments, k, self.config.method.collapse_share, where)  # type: ignore[union-attr]


@register_method("scan")
class SCAN(Method):
    """The staged SCAN method: pretext (unless the backbone is pretrained and frozen) -> mine -> scan -> selflabel."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.settings: SCANConfig = config.method  # type: ignore[assignment]
        self.clustering = SCANClustering(config)
        self.neighbours: Neighbours | None = None
        self.pretext = runs_pretext(config)

    def stages(self) -> list[Stage | StepStage]:
        s = self.settings
        stages: list[Stage | StepStage] = []
        if self.pretext:
            stages.append(
                Stage(
                    "pretext",
                    SimCLRPretext(self.config),
                    s.pretext_epochs,
                    s.pretext_lr,
                    optimizer=s.pretext_optimizer,
                    momentum=s.pretext_momentum,
                    weight_decay=s.pretext_weight_decay,
                    schedule=s.pretext_schedule,
                )
            )
        stages.append(StepStage("mine", NEIGHBOURS_FILE, self.mine, self.load_neighbours))
        stages.append(Stage("scan", self.clustering, s.scan_epochs, s.scan_lr))
        if s.selflabel_epochs > 0:
            stages.append(Stage("selflabel", SelfLabel(self.config), s.selflabel_epochs, s.selflabel_lr))
        return stages

    def mine_source(self) -> str:
        if self.settings.mine_on != "auto":
            return self.settings.mine_on
        return "projection" if self.pretext else "backbone"

    def mine(self, ctx: MethodContext, path: Path) -> None:
        """Top-k neighbours of the training set's embedding: cached clean features, or a clean pass through the
        (pretext) network; with `mine_on: projection`, through the instance projector."""
        source = self.mine_source()
        _, features, _ = ctx.predict(ctx.train_set)
        if source == "projection":
            with torch.inference_mode():
                ctx.model.eval()
                tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(ctx.device)
                features = torch.cat([ctx.model.instance_head(c) for c in tensor.split(4096)]).cpu().numpy()
        labels = ctx.train_labels
        mine(features, labels if (labels >= 0).all() else None, self.settings.neighbours, source).save(path)

    def load_neighbours(self, ctx: MethodContext, path: Path) -> None:
        neighbours = Neighbours.load(path)
        if neighbours.k != self.settings.neighbours:
            raise ValueError(f"{path} holds k={neighbours.k}, config asks {self.settings.neighbours}; use a new run")
        self.neighbours = neighbours
        self.clustering.neighbours = neighbours.indices
        agreement = None if math.isnan(neighbours.agreement) else neighbours.agreement  # no labels: null, not NaN
        log.info(json.dumps({"event": "neighbours", "k": neighbours.k, "agreement": agreement}))

    def summary(self, ctx: MethodContext) -> dict[str, Any]:
        agreement = self.neighbours.agreement if self.neighbours is not None else float("nan")
        return {
            "neighbour_k": self.settings.neighbours,
            "neighbour_agreement": None if math.isnan(agreement) else round(agreement, 4),
        }


def entropy_upper_bound(k: int) -> float:
    """log K: the largest value of H(mean p) (all clusters equally used) — for logs and tests."""
    return math.log(k)
