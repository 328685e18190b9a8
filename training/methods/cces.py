"""CCES — contrastive clustering with effective sample pairs (Yin, Wu, Sun, Information Fusion 2023), on CC's parts.

Two additions to CC, each behind a switch:

- `nn` (none | single1 | single2 | double): a FIFO support set S of L2-normalised backbone features. NN(xi1), the
  nearest neighbour in S of view 1's feature, takes view 1's place against view 2 (the paper's Algorithm 1 and
  Eqs. 3-7 only ever pair NN(xi1) with xi2): in the instance loss (tau_R) only (`single1`), in the cluster loss (tau_C)
  only (`single2`), or in both (`double`). Where the cluster loss uses the neighbour, its entropy (balance) term is on
  the neighbour's assignments phi_C(NN(xi1)) and view 2's (Eq. 9). Batch features are enqueued after the optimiser
  step, so a sample is never its own neighbour within a step. The neighbour search and the contrastive logits run in
  fp32 whatever the autocast (bf16 cosines break near-ties among 65,536 candidates by the lowest slot).
- `ccrop` (ContrastiveCrop): crops centred inside per-sample boxes from the backbone's heat maps
  (`training.data.ccrop`), plain crops during the warm-up share of the epochs, boxes refreshed every update share.
  With a frozen backbone (cached features) the heat maps never change: boxes are computed once and the ContrastiveCrop
  view is one extra cached augmented pass that replaces the last plain augmented pass (same number of views as CC).

`nn=none, ccrop=false` is exactly CC's loss (a test checks it). Test-time assignment is CC's: argmax phi_C(pi(x)).

The neighbour is a unit vector from S; it is rescaled to the query's norm before the heads, because the heads are
trained on un-normalised backbone features and a unit-norm input would sit far outside what they see otherwise
(a deviation the paper does not need: its heads see the backbone's features, which S stores un-normalised there).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.data.ccrop import BoxState, ContrastiveCrop, boxes_from_heatmaps, compute_heatmaps
from training.data.datasets import base_and_index
from training.data.views import CachedPasses, Recipe, cached_view_names
from training.features import cached_array, feature_key, frozen_pass
from training.losses.contrastive import cc_cluster_loss, nt_xent
from training.methods.base import Batch, Method, MethodContext, register_method
from training.models.heads import ClusteringModel

if TYPE_CHECKING:
    from training.config import CCESConfig, TrainConfig

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
        """Index into S of each query's nearest neighbour by L2 distance on normalised features (= max cosine), in
        fp32 even inside a bf16 autocast."""
        q = F.normalize(queries.detach().float(), dim=1).to(self.features.device)
        with torch.autocast(device_type=q.device.type, enabled=False):
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
        self.box_state = BoxState()  # read by every ContrastiveCrop runner; updated here between epochs
        self.boxes: torch.Tensor | None = None  # [N_train, 4] image fractions, per sample index
        self.boxes_epoch = -1  # epoch whose start computed the current boxes (-1: none yet)
        self._cached_data: CachedPasses | None = None
        self._ccrop_pass_in_use = False

    # ------------------------------------------------------------------ views
    def views(self) -> list[Recipe]:
        if not self.cfg.ccrop:
            return super().views()
        d = self.config.data
        crop = ContrastiveCrop(d.image_size, d.augment_strength, d.min_crop_scale, self.cfg.beta_alpha, self.box_state)
        return [crop, crop]

    def train_data(self, ctx: MethodContext) -> Dataset | None:
        """Cached ContrastiveCrop: the trainer's cached passes, held here so that the ContrastiveCrop pass can take
        the place of the last plain one once the warm-up is over."""
        if not (ctx.cached and self.cfg.ccrop):
            return None
        names = cached_view_names(self.config.model.feature_views)
        self._cached_data = CachedPasses(ctx.passes(ctx.train_set, names), ctx.train_labels)
        return self._cached_data

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
        mode = self.cfg.nn
        extras: dict[str, torch.Tensor] = {}
        n1 = h1
        if mode != "none":
            n1, index1 = self.neighbours(h1)
            extras["nn_label_agree"] = self._agreement(index1, batch.labels)
        anchor_r = n1 if mode in ("single1", "double") else h1  # view 1's stand-in in the instance loss
        anchor_c = n1 if mode in ("single2", "double") else h1  # ... and in the cluster loss
        u1, u2 = model.instance_head(anchor_r), model.instance_head(h2)
        p1, p2 = model.cluster_head(anchor_c), model.cluster_head(h2)
        with torch.autocast(device_type=h1.device.type, enabled=False):
            instance = nt_xent(u1.float(), u2.float(), tau_r)
            cluster = cc_cluster_loss(p1.float(), p2.float(), tau_c)  # Eq. 9: entropy on phi_C(anchor) and view 2
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
    def on_epoch_start(self, ctx: MethodContext, epoch: int) -> None:
        warmup, every = self.box_schedule()
        if not self.cfg.ccrop or epoch < warmup:
            return
        if ctx.cached:
            self._use_frozen_ccrop_pass(ctx)
            return
        due = (epoch - warmup) % every == 0
        if self.boxes is None or (due and self.boxes_epoch != epoch):
            self.boxes = self.compute_boxes(ctx)
            self.boxes_epoch = epoch
            log.info("cces: boxes updated at epoch %d (mean area %.3f)", epoch, float(box_areas(self.boxes).mean()))
        self.box_state.boxes = self.boxes
        self.box_state.active = True

    def box_schedule(self) -> tuple[int, int]:
        """(warm-up epochs, epochs between box updates): the configured shares of `optim.epochs`."""
        epochs = self.config.optim.epochs or 1
        return round(self.cfg.warmup_share * epochs), max(1, round(self.cfg.update_share * epochs))

    def compute_boxes(self, ctx: MethodContext) -> torch.Tensor:
        """Boxes of every training sample from the current backbone's heat maps."""
        d = self.config.data
        heat = compute_heatmaps(
            ctx.backbone,
            ctx.train_set,
            d.image_size,
            batch_size=256,
            workers=d.workers,
            device=ctx.device,
            autocast=ctx.autocast(),
        )
        return boxes_from_heatmaps(heat, self.cfg.box_threshold)

    def _use_frozen_ccrop_pass(self, ctx: MethodContext) -> None:
        """Cached mode: boxes once from the frozen backbone, and the ContrastiveCrop pass replaces the last plain
        augmented pass of the cached views (both cached on disk: computed once per machine)."""
        if self._ccrop_pass_in_use:
            return
        if self._cached_data is None:
            raise RuntimeError("cces with cached features builds its own training data first (train_data)")
        base, index = base_and_index(ctx.train_set)
        full = boxes_from_heatmaps(frozen_heatmaps(ctx, base), self.cfg.box_threshold)
        features = frozen_ccrop_pass(ctx, base, full, self.cfg.beta_alpha)
        self.boxes = full if index is None else full[index]
        self.boxes_epoch = 0
        self._cached_data.replace_pass(-1, features if index is None else features[index])
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
def frozen_heatmaps(ctx: MethodContext, base: Any) -> torch.Tensor:
    """Heat maps of the whole train split under the frozen backbone (one forward pass, cached)."""
    c = ctx.config
    key = feature_key(c.model.backbone, c.model.pretrained, base, "heatmap", 0, c.data.image_size)

    def compute() -> np.ndarray:
        d = c.data
        heat = compute_heatmaps(
            ctx.backbone, base, d.image_size, batch_size=128, workers=d.workers, device=ctx.device, progress=True
        )
        return heat.numpy()

    return torch.from_numpy(cached_array(key, compute))


def frozen_ccrop_pass(ctx: MethodContext, base: Any, boxes: torch.Tensor, alpha: float) -> np.ndarray:
    """Features of one seeded ContrastiveCrop-augmented pass over the whole train split (cached; the recipe's key
    holds the boxes' digest)."""
    c = ctx.config
    d = c.data
    recipe = ContrastiveCrop(d.image_size, d.augment_strength, d.min_crop_scale, alpha, BoxState(boxes, active=True))
    return frozen_pass(
        c.model.backbone,
        base,
        recipe,
        CCROP_PASS_SEED,
        pretrained=c.model.pretrained,
        backbone=ctx.backbone,
        workers=d.workers,
        device=ctx.device,
    )
