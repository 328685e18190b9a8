"""SCAN (Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels", ECCV 2020), from the paper.

Three methods on the one trainer, run in order by `training.scan_pipeline`:

- `simclr` — the pretext task: NT-Xent (tau = 0.1) between two SimCLR views on `model.instance_head`.
- `scan` — the clustering step: a sample and one of its mined neighbours should get the same cluster,
  loss = -mean log <p(x), p(n)> - lambda * H(mean p), for every head of `model.cluster_heads` at once; the head with
  the lowest loss becomes `model.head_index` (saved in the checkpoint; the exporter serves that head).
- `scan_selflabel` — self-labelling: confident weak-view predictions (max p > threshold) become pseudo-labels for a
  strong view (RandAugment + Cutout); cross-entropy weighted by the inverse pseudo-label frequency. A guard stops the
  stage with a report when one cluster takes most samples (the failure mode of self-training).

Views: with a frozen backbone and cached features (`model.cached_features`), views are cached passes ("clean",
"augI" CC augmentation, "strongI" RandAugment + Cutout applied at the native resolution, then resized); otherwise
views are computed per batch on the training device.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from training.losses.contrastive import entropy_of_mean, nt_xent
from training.methods.base import Batch, Method, register_method
from training.models.heads import ClusteringModel

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.trainer import Trainer

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


class CollapseError(RuntimeError):
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


# --------------------------------------------------------------------------------------------------- strong views
class StrongAugment(nn.Module):
    """RandAugment (2 ops, magnitude 10) + crop/flip per sample, then Cutout, then resize — on a batch.

    RandAugment runs per sample on uint8 tensors at the *input* resolution (PIL RandAugment at 160 px costs more than
    the backbone forward); Cutout (one zero square, side `cutout_fraction` of the image, centre anywhere, as in the
    paper) is batched; the result is resized (bicubic) to `size`.
    """

    def __init__(self, size: int, cutout_fraction: float = 0.5, num_ops: int = 2, magnitude: int = 10) -> None:
        super().__init__()
        self.size = size
        self.cutout_fraction = cutout_fraction
        self.sample_ops = T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=num_ops, magnitude=magnitude),
            ]
        )

    def cutout(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        side_h, side_w = max(int(round(h * self.cutout_fraction)), 0), max(int(round(w * self.cutout_fraction)), 0)
        if side_h == 0 or side_w == 0:
            return x
        cy = torch.randint(0, h, (n, 1, 1), device=x.device)
        cx = torch.randint(0, w, (n, 1, 1), device=x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        hole = ((rows - cy).abs() * 2 < side_h) & ((cols - cx).abs() * 2 < side_w)
        return x.masked_fill(hole.unsqueeze(1), 0.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, 3, H, W] in [0, 1] -> strong view [N, 3, size, size] in [0, 1]."""
        as_uint8 = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        out = torch.stack([self.sample_ops(image) for image in as_uint8.cpu()]).to(x.device).float() / 255.0
        out = self.cutout(out)
        if out.shape[-1] != self.size or out.shape[-2] != self.size:
            out = F.interpolate(out, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return out


class ChannelSlice(nn.Module):
    """Picks image `part` from channel-stacked images ([N, 3 * parts, H, W]) and augments it.

    The trainer's device-augmentation loop augments `views[0]` once per batch view; stacking (sample, neighbour) on
    the channel axis lets each batch view see its own image without a second training loop.
    """

    def __init__(self, part: int, augment: nn.Module) -> None:
        super().__init__()
        self.part = part
        self.augment = augment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x[:, 3 * self.part : 3 * self.part + 3])


# --------------------------------------------------------------------------------------------------- datasets
class NeighbourPairs(Dataset):
    """Item i -> (view of sample i, view of a random one of its mined neighbours, label, i).

    `passes` given: views are rows of cached feature passes (a random pass per side). Otherwise `base` is an image
    dataset and `transform` is applied to both images; with `stack=True` both are stacked on the channel axis.
    """

    def __init__(
        self,
        neighbours: np.ndarray,
        labels: np.ndarray,
        *,
        passes: list[np.ndarray] | None = None,
        base: Dataset | None = None,
        transform: Any = None,
        stack: bool = False,
    ) -> None:
        self.neighbours = np.asarray(neighbours)
        self.labels = np.asarray(labels)
        self.passes = [torch.from_numpy(p) for p in passes] if passes is not None else None
        self.base, self.transform, self.stack = base, transform, stack

    def __len__(self) -> int:
        return int(self.neighbours.shape[0])

    def _view(self, index: int) -> torch.Tensor:
        if self.passes is not None:
            return self.passes[random.randrange(len(self.passes))][index]
        image, _ = self.base[index]  # type: ignore[index]
        return self.transform(image)

    def __getitem__(self, index: int) -> tuple:
        neighbour = int(self.neighbours[index, random.randrange(self.neighbours.shape[1])])
        a, b = self._view(index), self._view(neighbour)
        if self.stack:
            return torch.cat([a, b], dim=0), int(self.labels[index]), index
        return a, b, int(self.labels[index]), index


class WeakStrongPasses(Dataset):
    """Item i -> (weak view, strong view, label, i) from cached passes (a random pass of each list)."""

    def __init__(self, weak: list[np.ndarray], strong: list[np.ndarray], labels: np.ndarray) -> None:
        self.weak = [torch.from_numpy(p) for p in weak]
        self.strong = [torch.from_numpy(p) for p in strong]
        self.labels = np.asarray(labels)

    def __len__(self) -> int:
        return int(self.weak[0].shape[0])

    def __getitem__(self, index: int) -> tuple:
        weak = self.weak[random.randrange(len(self.weak))][index]
        strong = self.strong[random.randrange(len(self.strong))][index]
        return weak, strong, int(self.labels[index]), index


def strong_features(trainer: Trainer, dataset: Dataset, split: str, view: str) -> np.ndarray:
    """Cached frozen-backbone features of the strong view `strongI` (seeded: the I-th pass is reproducible).

    Images are taken at their own resolution (RandAugment is cheap there) and resized after augmentation.
    """
    from torch.utils.data import Subset

    from serving.core.preprocess import resize_for_model
    from training.features import cached_embed, embed
    from training.models.backbones import create_backbone

    if not view.startswith("strong"):
        raise ValueError(f"not a strong view: {view!r}")
    base, index = (dataset.dataset, np.asarray(dataset.indices)) if isinstance(dataset, Subset) else (dataset, None)
    d, m = trainer.config.data, trainer.config.model
    native = int(np.asarray(base[0][0]).shape[0])  # square datasets (CIFAR 32, Fashion-MNIST 28); others resized
    fraction = trainer.config.method.cutout_fraction  # type: ignore[union-attr]
    key = {
        "backbone": m.backbone,
        "dataset": f"{d.dataset}:{split}",
        "n": len(base),
        "size": d.image_size,
        "view": view,
        "native": native,
        "augment_impl": f"randaugment2x10-flip-cutout{fraction}-native",
        "version": 1,
    }

    def native_tensor(image: Any) -> torch.Tensor:
        array = resize_for_model(image, native)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)

    def compute() -> np.ndarray:
        backbone = create_backbone(m.backbone, pretrained=True)
        return embed(
            backbone,
            base,
            native_tensor,
            workers=d.workers,
            seed=2000 + int(view.removeprefix("strong") or 0),
            desc=f"{d.dataset}:{split}:{view}",
            batch_augment=StrongAugment(d.image_size, fraction),
        )

    full = cached_embed(key, compute)
    return full if index is None else full[index]


def cached_views(trainer: Trainer, names: Sequence[str]) -> list[np.ndarray]:
    """Training-set feature passes by name: "clean", "augI" (trainer cache), "strongI" (this module's cache)."""
    split = trainer.config.data.train_split
    out = []
    for name in names:
        if name.startswith("strong"):
            out.append(strong_features(trainer, trainer.train_set, split, name))
        else:
            out.append(trainer.cached_passes(trainer.train_set, split, [name])[0])
    return out


# --------------------------------------------------------------------------------------------------- methods
@register_method("simclr")
class SimCLRPretext(Method):
    """SCAN's pretext task: NT-Xent on the instance projection of two SimCLR views (tau from the config).

    SimCLR's CIFAR augmentations are CC's with strength 0.5 (ColorJitter 0.4/0.4/0.4/0.1), so the base views apply.
    """

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        tau = self.config.method.pretext_temperature  # type: ignore[union-attr]
        h1, h2 = batch.features[0], batch.features[1]
        loss = nt_xent(model.instance_head(h1), model.instance_head(h2), tau)
        return {"loss": loss}


@register_method("scan")
class SCANClustering(Method):
    """SCAN loss on (sample, neighbour) pairs for every cluster head; keeps the lowest-loss head."""

    def __init__(self, config: TrainConfig, neighbours: np.ndarray | None = None) -> None:
        super().__init__(config)
        self.neighbours = neighbours

    def batch_views(self) -> list[nn.Module]:
        from training.data.batch_augment import BatchAugment

        d = self.config.data
        return [ChannelSlice(i, BatchAugment(d.image_size, d.augment_strength, d.min_crop_scale)) for i in range(2)]

    def train_dataset(self, trainer: Trainer) -> Dataset:
        if self.neighbours is None:
            raise ValueError("SCAN needs mined neighbours (run the pipeline's mine stage first)")
        labels = np.asarray(trainer.train_set.labels)  # type: ignore[attr-defined]
        if trainer.cached:
            views = ["clean", *(f"aug{i}" for i in range(trainer.config.model.feature_views))]
            return NeighbourPairs(self.neighbours, labels, passes=cached_views(trainer, views))
        if trainer.device_augment:
            from training.data.views import eval_transform

            return NeighbourPairs(
                self.neighbours,
                labels,
                base=trainer.train_set,
                transform=eval_transform(trainer.config.data.image_size),
                stack=True,
            )
        return NeighbourPairs(self.neighbours, labels, base=trainer.train_set, transform=self.train_views()[0])

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

    def on_epoch_end(self, trainer: Trainer, losses: dict[str, float]) -> None:
        head_losses = [losses[f"head{i}"] for i in range(len(trainer.model.cluster_heads))]
        trainer.model.head_index = select_head(head_losses)
        losses["head_index"] = trainer.model.head_index


@register_method("scan_selflabel")
class SelfLabel(Method):
    """Self-labelling of the kept head on (weak, strong) views, with the collapse guard."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self._assignments: list[torch.Tensor] = []
        self._checked_start = False

    def batch_views(self) -> list[nn.Module]:
        from training.data.batch_augment import BatchAugment

        d = self.config.data
        weak = BatchAugment(d.image_size, d.augment_strength, min_scale=0.6, jitter_p=0.0, grayscale_p=0.0)
        return [weak, StrongAugment(d.image_size, self.config.method.cutout_fraction)]  # type: ignore[union-attr]

    def train_views(self) -> list[Any]:
        from training.data.views import strong_augment, weak_augment

        size = self.config.data.image_size
        return [weak_augment(size), strong_augment(size)]

    def train_dataset(self, trainer: Trainer) -> Dataset | None:
        if not trainer.cached:
            return None  # the trainer's own recipe (loader or device views from this method)
        strong = self.config.method.selflabel_strong_views  # type: ignore[union-attr]
        labels = np.asarray(trainer.train_set.labels)  # type: ignore[attr-defined]
        return WeakStrongPasses(cached_views(trainer, ["clean"]), cached_views(trainer, strong), labels)

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        threshold = self.config.method.selflabel_threshold  # type: ignore[union-attr]
        head = model.cluster_head
        with torch.no_grad():
            p_weak = head(batch.features[0]).float()
        self._assignments.append(p_weak.argmax(dim=1).cpu())
        loss, mask = selflabel_loss(head.logits(batch.features[1]), p_weak, threshold)
        return {"loss": loss, "confident": mask.float().mean().detach()}

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._assignments = []
        if not self._checked_start:  # first epoch of this process: check the model we start from
            self._checked_start = True
            probabilities, _, _ = trainer.predict()
            self.guard(probabilities.argmax(axis=1), trainer.model.k, f"selflabel start (epoch {epoch})")

    def on_epoch_end(self, trainer: Trainer, losses: dict[str, float]) -> None:
        if self._assignments:
            sizes = self.guard(
                torch.cat(self._assignments).numpy(), trainer.model.k, f"selflabel epoch {trainer.epoch + 1}"
            )
            losses["largest_share"] = round(max(sizes) / max(sum(sizes), 1), 4)

    def guard(self, assignments: np.ndarray, k: int, where: str) -> list[int]:
        return check_collapse(assignments, k, self.config.method.collapse_share, where)  # type: ignore[union-attr]


def entropy_upper_bound(k: int) -> float:
    """log K: the largest value of H(mean p) (all clusters equally used) — for logs and tests."""
    return math.log(k)
