"""ContrastiveCrop (Peng et al., CVPR 2022), the crop CCES uses: semantic-aware boxes from the backbone's heat maps,
then RandomResizedCrop whose *centre* is drawn inside the box from Beta(alpha, alpha).

Boxes are fractions of the image, `(x0, y0, x1, y1)` in [0, 1], one row per training sample (so they do not depend
on the image resolution). A box of `(0, 0, 1, 1)` means "no localisation yet". Why Beta: alpha < 1 pushes centres
towards the box edges, so crops still vary while staying on the object (alpha = 1 is uniform inside the box).

`ContrastiveCrop` is the view recipe (`training.data.views`); its two runners share `sample_crops`: a per-image PIL
view for DataLoader workers (`ContrastiveCropView`, called with the sample index), and a batched one on the training
device or for a cached pass (`BatchContrastiveCrop`). Both read one `BoxState`, which the method updates between
epochs, and fall back to the plain CC augmentation while it is inactive (the warm-up epochs, when the heat maps are
still meaningless).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from training.data.batch_augment import BatchAugment
from training.data.views import CropJitter, MultiView, Recipe, _to_rgb, _to_tensor, eval_transform
from training.features import onnx_forward
from training.models.backbones import MultiSpace

FULL_BOX = (0.0, 0.0, 1.0, 1.0)
RATIO = (3 / 4, 4 / 3)


def full_boxes(n: int) -> torch.Tensor:
    """Initial boxes: the whole image for every sample."""
    return torch.tensor(FULL_BOX, dtype=torch.float32).repeat(n, 1)


class BoxState:
    """The boxes every ContrastiveCrop runner reads, updated in place by the method between epochs (DataLoader
    workers are created per epoch, so they see the new boxes). Inactive: the plain CC augmentation."""

    def __init__(self, boxes: torch.Tensor | None = None, active: bool = False) -> None:
        self.boxes = boxes if boxes is not None else full_boxes(1)
        self.active = active

    def digest(self) -> str:
        return hashlib.sha256(self.boxes.numpy().tobytes()).hexdigest()[:16] if self.active else "inactive"


@dataclass(frozen=True)
class ContrastiveCrop(Recipe):
    """CC's augmentation with the crop centre drawn (Beta(alpha, alpha)) inside each sample's box."""

    size: int
    strength: float = 0.5
    min_scale: float = 0.08
    alpha: float = 0.6
    state: BoxState = field(default_factory=BoxState, compare=False, repr=False)
    kind = "contrastive_crop"
    per_sample = True

    def key(self) -> dict[str, Any]:
        plain = {k: v for k, v in vars(self).items() if k != "state"}
        return {"kind": self.kind, **plain, "boxes": self.state.digest()}

    def per_image(self) -> ContrastiveCropView:
        return ContrastiveCropView(self)

    def batched(self) -> BatchContrastiveCrop:
        return BatchContrastiveCrop(self)


# ------------------------------------------------------------------------------------------------ heat maps -> boxes
def heatmaps_from_feature_maps(feature_maps: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] last conv feature map -> [N, h, w] heat map: channel sum, min-max normalised per image.

    A constant map (no information) becomes all ones, i.e. a full-image box.
    """
    heat = feature_maps.float().sum(dim=1)
    flat = heat.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    span = (flat.amax(dim=1) - flat.amin(dim=1)).view(-1, 1, 1)
    normalised = (heat - low) / span.clamp_min(1e-12)
    return torch.where(span > 1e-12, normalised, torch.ones_like(heat))


def boxes_from_heatmaps(heatmaps: torch.Tensor, threshold: float = 0.1, resolution: int = 64) -> torch.Tensor:
    """[N, h, w] normalised heat maps -> [N, 4] boxes (x0, y0, x1, y1) as image fractions.

    As in ContrastiveCrop: upsample the map bilinearly to the image grid, keep the rows and columns whose maximum
    exceeds `threshold`, and take the box spanning the first to the last of them. `resolution` is the grid the box
    is quantised to (boxes are fractions, so it need not equal the training image size).
    """
    if heatmaps.ndim != 3:
        raise ValueError(f"heat maps must be [N, h, w], got {tuple(heatmaps.shape)}")
    n = heatmaps.shape[0]
    if n == 0:
        return torch.empty(0, 4)
    up = F.interpolate(heatmaps[:, None].float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
    up = up[:, 0]
    rows = up.amax(dim=2) > threshold  # [N, resolution] over y
    cols = up.amax(dim=1) > threshold  # [N, resolution] over x

    def span(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = mask.float().argmax(dim=1)
        last = resolution - 1 - mask.flip(1).float().argmax(dim=1)
        return first.float() / resolution, (last.float() + 1) / resolution

    x0, x1 = span(cols)
    y0, y1 = span(rows)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~(rows.any(dim=1) & cols.any(dim=1))  # threshold above the whole map: no localisation
    return torch.where(empty[:, None], torch.tensor(FULL_BOX), boxes)


class _HeatMaps(torch.nn.Module):
    """Backbone -> heat maps as one module, so that a CPU pass can run it on onnxruntime like a feature pass.

    Several spaces (`MultiSpace`) give one map: each backbone's normalised map, resized to the first one's grid, then
    summed and normalised again, so every space has an equal vote on where the object is.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.backbone, MultiSpace):
            return heatmaps_from_feature_maps(self.backbone.feature_map(images))
        maps = [heatmaps_from_feature_maps(part.feature_map(images))[:, None] for part in self.backbone.parts]
        grid = maps[0].shape[-2:]
        resized = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear") for m in maps]
        return heatmaps_from_feature_maps(torch.cat(resized, dim=1))


def compute_heatmaps(
    backbone: torch.nn.Module,
    dataset: Dataset,
    image_size: int,
    *,
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str = "cpu",
    autocast: torch.autocast | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Heat maps of every image of `dataset` (serving pre-processing, no augmentation), in dataset order.

    The backbone runs in eval mode (BN running statistics must not move) and is put back in its previous mode. On a
    CPU without autocast it runs on onnxruntime, checked against torch on the first batch, as feature passes do
    (`training.features.onnx_forward`).
    """
    was_training = backbone.training
    backbone.eval()
    # A generator of its own: a loader without one draws its workers' base seed from the global RNG, so a heat-map
    # pass computed mid-training (a cache miss) would shift the run's random stream against a run that hit the cache.
    loader = DataLoader(
        MultiView(dataset, [eval_transform(image_size)]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="heat maps", unit="batch", mininterval=5)
    module = _HeatMaps(backbone).eval()
    on_cpu = torch.device(device).type == "cpu" and autocast is None

    def on_torch(images: torch.Tensor) -> np.ndarray:
        with autocast or nullcontext():
            return module(images).float().cpu().numpy()

    run: Callable[[torch.Tensor], np.ndarray] | None = None
    chunks = []
    try:
        with torch.inference_mode():
            for images, _, _ in loader:
                images = images.to(device)
                if run is None:
                    run = (onnx_forward(module, images[:8]) if on_cpu else None) or on_torch
                chunks.append(run(images))
    finally:
        backbone.train(was_training)
    return torch.from_numpy(np.concatenate(chunks))


# ------------------------------------------------------------------------------------------------ crop sampling
def sample_centres(lo: torch.Tensor, hi: torch.Tensor, extent: torch.Tensor, alpha: float) -> torch.Tensor:
    """Crop centres along one axis (fractions): Beta(alpha, alpha) inside [lo, hi] (the box), restricted so the crop
    of width `extent` stays inside the image. When box and image constraints leave nothing (a large crop and a box at
    the border) the centre is the point of the feasible range nearest the box centre."""
    half = extent / 2
    low = torch.maximum(lo, half)
    high = torch.minimum(hi, 1 - half)
    t = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample(lo.shape)
    t = t.to(lo.device)
    inside = low + (high - low) * t
    fallback = torch.minimum(torch.maximum((lo + hi) / 2, half), 1 - half)
    return torch.where(low <= high, inside, fallback)


def sample_crops(
    boxes: torch.Tensor, min_scale: float, alpha: float, ratio: tuple[float, float] = RATIO
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cx, cy, w, h) as image fractions, one crop per box row: area and aspect ratio as RandomResizedCrop
    (area in [min_scale, 1], log-uniform ratio), centre from `sample_centres`."""
    n, device = boxes.shape[0], boxes.device
    area = torch.empty(n, device=device).uniform_(min_scale, 1.0)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = sample_centres(boxes[:, 0], boxes[:, 2], w, alpha)
    cy = sample_centres(boxes[:, 1], boxes[:, 3], h, alpha)
    return cx, cy, w, h


# ------------------------------------------------------------------------------------------------ the two views
class ContrastiveCropView:
    """Per-image (PIL) runner of `ContrastiveCrop`; called as `view(image, index)` (`per_sample`)."""

    per_sample = True

    def __init__(self, recipe: ContrastiveCrop) -> None:
        self.recipe = recipe
        self.state = recipe.state
        self.plain = CropJitter(recipe.size, recipe.strength, recipe.min_scale).per_image()
        s = recipe.strength
        self.after_crop = T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(p=0.2),
                *_to_tensor(),
            ]
        )
        self.to_rgb = _to_rgb()

    def __call__(self, image: Image.Image, index: int) -> torch.Tensor:
        if not self.state.active:
            return self.plain(image)
        r = self.recipe
        image = self.to_rgb(image)
        width, height = image.size
        box = self.state.boxes[index : index + 1]
        cx, cy, w, h = (float(v) for v in sample_crops(box, r.min_scale, r.alpha))
        crop_w, crop_h = max(1, round(w * width)), max(1, round(h * height))
        left = min(max(0, round(cx * width - crop_w / 2)), width - crop_w)
        top = min(max(0, round(cy * height - crop_h / 2)), height - crop_h)
        crop = TF.resized_crop(image, top, left, crop_h, crop_w, [r.size, r.size], antialias=True)
        return self.after_crop(crop)


class BatchContrastiveCrop(BatchAugment):
    """Batched runner of `ContrastiveCrop`: crop centres from each sample's box; call as `augment(images, indices)`."""

    per_sample = True

    def __init__(self, recipe: ContrastiveCrop) -> None:
        super().__init__(recipe.size, recipe.strength, recipe.min_scale)
        self.state = recipe.state  # plain attribute (not a buffer): shared with the method, updated in place
        self.alpha = recipe.alpha

    def crop_in_boxes(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        n, device = x.shape[0], x.device
        cx, cy, w, h = sample_crops(boxes.to(device), self.min_scale, self.alpha)
        flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx * 2 - 1
        theta[:, 1, 1], theta[:, 1, 2] = h, cy * 2 - 1
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if not self.state.active or indices is None:
            return super().forward(x)
        cropped = self.crop_in_boxes(x.float(), self.state.boxes[indices.cpu()])
        return self.grayscale(self.jitter(cropped))
