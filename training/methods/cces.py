"""CCES — contrastive clustering with effective sample pairs (Information Fusion, 2023), built on CC's parts.

Two additions to CC, each behind a switch:

- `nn` (none | single | double): a FIFO support set S of L2-normalised backbone features. The positive of view 2 is
  the nearest neighbour in S of view 1's feature, NN(xi1), instead of xi1 itself: the instance loss (tau_R) contrasts
  phi_R(NN(xi1)) with u2 = phi_R(xi2), the cluster loss (tau_C) contrasts phi_C(NN(xi1)) with phi_C(xi2); `double`
  adds the mirrored pair (NN(xi2) against view 1) and averages the two, so loss scales stay CC's. The entropy
  (balance) term is CC's, on the batch's own assignments. Batch features are enqueued after the optimiser step, so
  a sample is never its own neighbour within a step.
- `ccrop` (ContrastiveCrop): crops centred inside per-sample boxes from the backbone's heat maps
  (`training.data.ccrop`), plain crops during the warm-up epochs, boxes refreshed every `update_every` epochs.
  With a frozen backbone (cached features) the heat maps never change: boxes are computed once and the ContrastiveCrop
  view is one extra cached augmented pass that replaces the last plain augmented pass (same number of views as CC).

`nn=none, ccrop=false` is exactly CC's loss (a test checks it). Test-time assignment is CC's: argmax phi_C(pi(x)).

The neighbour is a unit vector from S; it is rescaled to the query's norm before the heads, because the heads are
trained on un-normalised backbone features and a unit-norm input would sit far outside what they see otherwise.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from training.data.ccrop import (
    BatchContrastiveCrop,
    ContrastiveCropView,
    boxes_from_heatmaps,
    compute_heatmaps,
    full_boxes,
)
from training.losses.contrastive import balance_term, cc_cluster_loss, cluster_contrastive, nt_xent
from training.methods.base import Batch, Method, register_method
from training.models.heads import ClusteringModel

if TYPE_CHECKING:
    from training.config import CCESConfig, TrainConfig
    from training.trainer import Trainer

log = logging.getLogger("deepclust.cces")

QUEUE_SEED_OFFSET = 7_919  # the queue's random start draws from its own generator: CC's random stream is untouched
CCROP_PASS_SEED = 2_000


class FeatureQueue:
    """FIFO support set of L2-normalised features (randomly initialised), with a ring pointer.

    `enqueue` writes at `ptr` modulo the size, so a batch that wraps around the end overwrites the oldest entries at
    the start and drops nothing of its own. Labels ride along for diagnostics only (-1 for the random start).
    """

    def __init__(self, size: int, dim: int, seed: int = 0, device: torch.device | str = "cpu") -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        x = F.normalize(features.detach().float(), dim=1).to(self.features.device)
        y = labels.detach().to(self.labels.device).long() if labels is not None else torch.full_like(x[:, 0], -1).long()
        if x.shape[0] >= self.size:  # more than fits: only the newest `size` survive, oldest first
            self.features.copy_(x[-self.size :])
            self.labels.copy_(y[-self.size :])
            self.ptr = 0
            return
        slots = (self.ptr + torch.arange(x.shape[0], device=x.device)) % self.size
        self.features[slots] = x
        self.labels[slots] = y
        self.ptr = (self.ptr + x.shape[0]) % self.size

    def ordered(self) -> torch.Tensor:
        """Entries oldest first (the next to be overwritten is row 0)."""
        return torch.roll(self.features, -self.ptr, dims=0)

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """Index into S of each query's nearest neighbour by L2 distance on normalised features (= max cosine)."""
        q = F.normalize(queries.detach().float(), dim=1).to(self.features.device)
        return (q @ self.features.t()).argmax(dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features.cpu(), "labels": self.labels.cpu(), "ptr": torch.tensor(self.ptr)}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> FeatureQueue:
        queue = cls.__new__(cls)
        queue.features = state["features"].float().to(device)
        queue.labels = state["labels"].long().to(device)
        queue.ptr = int(state["ptr"])
        return queue


@register_method("cces")
class CCES(Method):
    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.cfg: CCESConfig = config.method  # type: ignore[assignment]
        self.queue: FeatureQueue | None = None
        self.boxes: torch.Tensor | None = None  # [N_train, 4] image fractions, per sample index
        self.boxes_epoch = -1  # epoch whose start computed the current boxes (-1: none yet)
        self._crop_views: list[ContrastiveCropView | BatchContrastiveCrop] = []
        self._ccrop_pass_in_use = False

    # ------------------------------------------------------------------ views
    def train_views(self) -> list:
        if not self.cfg.ccrop:
            return super().train_views()
        d = self.config.data
        view = ContrastiveCropView(
            d.image_size, full_boxes(1), self.cfg.beta_alpha, d.augment_strength, d.min_crop_scale
        )
        self._crop_views.append(view)
        return [view, view]

    def batch_views(self) -> list[torch.nn.Module]:
        if not self.cfg.ccrop:
            return super().batch_views()
        d = self.config.data
        views = [
            BatchContrastiveCrop(d.image_size, full_boxes(1), self.cfg.beta_alpha, d.augment_strength, d.min_crop_scale)
            for _ in range(2)
        ]
        self._crop_views.extend(views)
        return views

    # ------------------------------------------------------------------ loss
    def neighbours(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(NN(xi) rescaled to each query's norm (see the module docstring), its index in S); no gradient."""
        queue = self._queue_for(features)
        index = queue.nearest(features)
        norms = features.detach().float().norm(dim=1, keepdim=True)
        return (queue.features[index] * norms).to(features.dtype), index

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        h1, h2 = batch.features[0], batch.features[1]
        tau_r, tau_c = self.cfg.instance_temperature, self.cfg.cluster_temperature
        u1, u2 = model.instance_head(h1), model.instance_head(h2)
        p1, p2 = model.cluster_head(h1), model.cluster_head(h2)
        if self.cfg.nn == "none":
            instance = nt_xent(u1, u2, tau_r)
            cluster = cc_cluster_loss(p1, p2, tau_c)
            return {"loss": instance + cluster, "instance": instance.detach(), "cluster": cluster.detach()}

        n1, index1 = self.neighbours(h1)
        instance = nt_xent(model.instance_head(n1), u2, tau_r)
        contrast = cluster_contrastive(model.cluster_head(n1), p2, tau_c)
        extras = {"nn_label_agree": self._agreement(index1, batch.labels)}
        if self.cfg.nn == "double":
            n2, _ = self.neighbours(h2)
            instance = (instance + nt_xent(model.instance_head(n2), u1, tau_r)) / 2
            contrast = (contrast + cluster_contrastive(model.cluster_head(n2), p1, tau_c)) / 2
        cluster = contrast + balance_term(p1) + balance_term(p2)
        return {"loss": instance + cluster, "instance": instance.detach(), "cluster": cluster.detach(), **extras}

    def _agreement(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Share of neighbours with the query's label, among real (enqueued) entries: a diagnostic, never a loss."""
        assert self.queue is not None
        found = self.queue.labels[index]
        labels = labels.to(found.device)
        real = (found >= 0) & (labels >= 0)
        if not bool(real.any()):
            return torch.tensor(0.0)
        return (found[real] == labels[real]).float().mean().cpu()

    def _queue_for(self, features: torch.Tensor) -> FeatureQueue:
        if self.queue is None:
            seed = self.config.run.seed + QUEUE_SEED_OFFSET
            self.queue = FeatureQueue(self.cfg.queue_size, features.shape[1], seed, features.device)
        return self.queue

    def on_step_end(self, batch: Batch) -> None:
        if self.cfg.nn != "none":
            self._queue_for(batch.features[0]).enqueue(batch.features[0], batch.labels)

    # ------------------------------------------------------------------ ContrastiveCrop boxes
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if not self.cfg.ccrop or epoch < self.cfg.warmup_epochs:
            return
        if trainer.cached:
            self._use_frozen_ccrop_pass(trainer)
            return
        due = (epoch - self.cfg.warmup_epochs) % self.cfg.update_every == 0
        if self.boxes is None or (due and self.boxes_epoch != epoch):
            self.boxes = self.compute_boxes(trainer)
            self.boxes_epoch = epoch
            log.info("cces: boxes updated at epoch %d (mean area %.3f)", epoch, float(box_areas(self.boxes).mean()))
        for view in self._crop_views:
            view.boxes = self.boxes
            view.active = True

    def compute_boxes(self, trainer: Trainer) -> torch.Tensor:
        """Boxes of every training sample from the current backbone's heat maps."""
        d = self.config.data
        heat = compute_heatmaps(
            trainer.model.backbone,
            trainer.train_set,
            d.image_size,
            batch_size=256,
            workers=d.workers,
            device=trainer.device,
            autocast=trainer.autocast(),
        )
        return boxes_from_heatmaps(heat, self.cfg.box_threshold)

    def _use_frozen_ccrop_pass(self, trainer: Trainer) -> None:
        """Cached mode: boxes once from the frozen backbone, and the ContrastiveCrop pass replaces the last plain
        augmented pass of the cached views (both cached on disk: computed once per machine)."""
        if self._ccrop_pass_in_use:
            return
        data = getattr(trainer, "train_data", None)
        if data is None or not hasattr(data, "passes"):
            raise RuntimeError("cces with cached features needs the trainer's `train_data` (CachedFeatureViews)")
        heat, base_index = frozen_heatmaps(trainer)
        full = boxes_from_heatmaps(heat, self.cfg.box_threshold)
        features = frozen_ccrop_pass(trainer, full, self.cfg.beta_alpha)
        self.boxes = full if base_index is None else full[base_index]
        self.boxes_epoch = 0
        chosen = features if base_index is None else features[base_index]
        data.passes[-1] = torch.from_numpy(np.ascontiguousarray(chosen))
        self._ccrop_pass_in_use = True
        log.info("cces: ContrastiveCrop pass in use (mean box area %.3f)", float(box_areas(self.boxes).mean()))

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.queue is not None:
            state["queue"] = self.queue.state_dict()
        if self.boxes is not None:
            state["boxes"] = self.boxes.cpu()
            state["boxes_epoch"] = self.boxes_epoch
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "queue" in state:
            device = "cuda" if torch.cuda.is_available() and self.config.run.device != "cpu" else "cpu"
            self.queue = FeatureQueue.from_state(state["queue"], device)
        if "boxes" in state:
            self.boxes = state["boxes"].float()
            self.boxes_epoch = int(state.get("boxes_epoch", -1))


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# ---------------------------------------------------------------------- frozen-backbone (cached) passes
def _base_and_index(dataset: Any) -> tuple[Any, np.ndarray | None]:
    if isinstance(dataset, Subset):
        return dataset.dataset, np.asarray(dataset.indices)
    return dataset, None


def _cache_key(trainer: Trainer, base: Any, view: str, **more: Any) -> dict[str, Any]:
    c = trainer.config
    return {
        "backbone": c.model.backbone,
        "pretrained": c.model.pretrained,
        "dataset": f"{c.data.dataset}:{c.data.train_split}",
        "n": len(base),
        "size": c.data.image_size,
        "view": view,
        "version": 1,
        **more,
    }


def frozen_heatmaps(trainer: Trainer) -> tuple[torch.Tensor, np.ndarray | None]:
    """Heat maps of the whole train split under the frozen backbone (one 50k forward pass on CIFAR-10, cached)."""
    from training.features import cached_embed

    base, index = _base_and_index(trainer.train_set)
    d = trainer.config.data

    def compute() -> np.ndarray:
        heat = compute_heatmaps(
            trainer.model.backbone,
            base,
            d.image_size,
            batch_size=128,
            workers=d.workers,
            device=trainer.device,
            progress=True,
        )
        return heat.numpy()

    return torch.from_numpy(cached_embed(_cache_key(trainer, base, "heatmap"), compute)), index


def frozen_ccrop_pass(trainer: Trainer, boxes: torch.Tensor, alpha: float) -> np.ndarray:
    """Features of one seeded ContrastiveCrop-augmented pass over the whole train split (one more 50k pass, cached).

    Runs under a forked RNG so computing it (a cache miss mid-training) leaves the training random stream alone.
    """
    from tqdm import tqdm

    from training.data.views import MultiView, eval_transform
    from training.features import cached_embed

    base, _ = _base_and_index(trainer.train_set)
    d = trainer.config.data
    digest = hashlib.sha256(boxes.numpy().tobytes()).hexdigest()[:16]
    key = _cache_key(
        trainer, base, "ccrop0", strength=d.augment_strength, min_scale=d.min_crop_scale, alpha=alpha, boxes=digest
    )
    backbone = trainer.model.backbone

    @torch.inference_mode()
    def compute() -> np.ndarray:
        augment = BatchContrastiveCrop(d.image_size, boxes, alpha, d.augment_strength, d.min_crop_scale)
        augment.active = True
        was_training = backbone.training
        backbone.eval()
        out = np.empty((len(base), backbone.feature_dim), dtype=np.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CCROP_PASS_SEED)
            loader = DataLoader(
                MultiView(base, [eval_transform(d.image_size)]), batch_size=128, shuffle=False, num_workers=d.workers
            )
            for images, _, index in tqdm(loader, desc="ccrop pass", unit="batch", mininterval=5):
                views = augment(images.to(trainer.device), index)
                out[index.numpy()] = backbone(views).float().cpu().numpy()
        backbone.train(was_training)
        return out

    return cached_embed(key, compute)
