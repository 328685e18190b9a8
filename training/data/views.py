"""View recipes, and the one place that turns a recipe into tensors on each data path.

A *recipe* is a frozen description of an augmentation (its ops and parameter ranges). Every recipe runs on the three
data paths with the same ops and the same ranges:

- `per_image()`: a callable on one PIL image, run in DataLoader workers (`data.augment_on=loader`);
- `batched()`: an `nn.Module` on a whole batch on the training device (`data.augment_on=device`); its input is the
  clean view (the serving pre-processing) of each image;
- a cached pass of frozen-backbone features (`model.cached_features`): `batched()` applied once, seeded, to the whole
  dataset (`training.features.frozen_pass`). Cached passes are named: `clean`, `augI` (the data config's
  `CropJitter`, I-th seeded pass), `strongI` (the method's `Strong` recipe, I-th pass); `named_pass` resolves them.

All views are float RGB tensors in [0, 1] (grey images are replicated to RGB, as in serving); backbones normalise.
Known difference between paths: the batched hue shift is a rotation in YIQ space (torchvision's per-image one works in
HSV): a close, vectorisable stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from serving.core.preprocess import resize_for_model

Transform = Callable[[Image.Image], torch.Tensor]


def _to_rgb() -> T.Transform:
    return T.Lambda(lambda im: im.convert("RGB") if isinstance(im, Image.Image) and im.mode != "RGB" else im)


def _to_tensor() -> list[T.Transform]:
    return [T.PILToTensor(), T.ToDtype(torch.float32, scale=True)]


def eval_transform(size: int) -> Transform:
    """Exactly the serving pre-processing (bicubic resize, no crop), as a float tensor."""

    def transform(image: Image.Image) -> torch.Tensor:
        array = resize_for_model(image, size)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)

    return transform


class Recipe:
    """Base of the view recipes: a frozen dataclass whose fields are everything that changes the pixels."""

    kind = "recipe"
    per_sample = False  # True: the augmentation also needs each sample's index (ContrastiveCrop boxes)

    def key(self) -> dict[str, Any]:
        """What a cached pass of this recipe is keyed by (the kind plus every field)."""
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]

    def per_image(self) -> Transform:
        raise NotImplementedError

    def batched(self) -> nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class Clean(Recipe):
    """No augmentation: the serving pre-processing."""

    size: int
    kind = "clean"

    def per_image(self) -> Transform:
        return eval_transform(self.size)

    def batched(self) -> nn.Module:
        return _Resize(self.size)


@dataclass(frozen=True)
class CropJitter(Recipe):
    """CC's / SimCLR's augmentation: RandomResizedCrop(min_scale..1), flip, ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with
    p = jitter_p, grayscale with p = grayscale_p. SimCLR's CIFAR recipe is strength 0.5; SCAN's weak view is
    min_scale 0.6 with jitter_p = grayscale_p = 0."""

    size: int
    strength: float = 0.5
    min_scale: float = 0.08
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    kind = "crop_jitter"

    def per_image(self) -> Transform:
        s = self.strength
        ops: list[T.Transform] = [
            _to_rgb(),
            T.RandomResizedCrop(self.size, scale=(self.min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
        ]
        if self.jitter_p > 0:
            ops.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=self.jitter_p))
        if self.grayscale_p > 0:
            ops.append(T.RandomGrayscale(p=self.grayscale_p))
        return T.Compose([*ops, *_to_tensor()])

    def batched(self) -> nn.Module:
        from training.data.batch_augment import BatchAugment

        return BatchAugment(
            self.size, self.strength, self.min_scale, jitter_p=self.jitter_p, grayscale_p=self.grayscale_p
        )


@dataclass(frozen=True)
class Strong(Recipe):
    """SCAN's strong view as in its official code: flip, `num_ops` of 14 RandAugment-style ops at random magnitudes,
    Cutout of a square of random side up to `cutout_fraction` of the image, then a bicubic resize to `size`
    (`training.data.batch_augment.StrongAugment`).

    The ops run at the resolution the image arrives in (its own on the loader path and in cached passes; the clean
    view's on the device path), so RandAugment costs little on small images.
    """

    size: int
    cutout_fraction: float = 0.5
    num_ops: int = 4
    kind = "scan_strong"

    def per_image(self) -> Transform:
        module = self.batched()

        def transform(image: Image.Image) -> torch.Tensor:
            array = np.asarray(image.convert("RGB"))
            tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)
            return module(tensor.unsqueeze(0))[0]

        return transform

    def batched(self) -> nn.Module:
        from training.data.batch_augment import StrongAugment

        return StrongAugment(self.size, self.cutout_fraction, self.num_ops)


class _Resize(nn.Module):
    """The clean view on a batch: identity when already at `size`, else a bicubic resize."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)


def named_pass(name: str, size: int, augment: CropJitter, strong: Strong | None = None) -> tuple[Recipe, int]:
    """(recipe, seed) of a named cached pass: `clean`, `augI` (the data augmentation) or `strongI` (`strong`)."""
    if name == "clean":
        return Clean(size), 0
    for prefix, recipe, seed_base in (("aug", augment, 1000), ("strong", strong, 2000)):
        index = name.removeprefix(prefix)
        if name.startswith(prefix) and index.isdigit():
            if recipe is None:
                raise ValueError(f"pass {name!r} needs a {prefix} recipe, and this method has none")
            return recipe, seed_base + int(index)
    raise ValueError(f"unknown pass {name!r}: expected clean, aug<I> or strong<I>")


def cached_view_names(feature_views: int) -> list[str]:
    """The cached passes contrastive methods draw pairs from: the clean pass and `feature_views` augmented ones."""
    return ["clean", *(f"aug{i}" for i in range(feature_views))]


def data_augmentation(data_config: Any) -> CropJitter:
    """The data config's augmentation (`data.image_size`, `augment_strength`, `min_crop_scale`)."""
    return CropJitter(data_config.image_size, data_config.augment_strength, data_config.min_crop_scale)


class MultiView(Dataset):
    """Wraps a dataset: item -> (view_1, ..., view_n, label, index). The index lets methods keep per-sample state."""

    def __init__(self, base: Dataset, transforms: Sequence[Callable[..., torch.Tensor]]) -> None:
        self.base = base
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        image, label = self.base[index]
        # `per_sample` transforms (ContrastiveCrop) are called with the sample index too
        views = (t(image, index) if getattr(t, "per_sample", False) else t(image) for t in self.transforms)
        return (*views, label, index)


def random_rows(passes: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Rows `index`, each from one of `passes` drawn uniformly (torch's RNG): one gather per pass."""
    if len(passes) == 1:
        return passes[0][index]
    return _rows_by_choice(passes, index, torch.randint(len(passes), (len(index),)))


def _rows_by_choice(passes: Sequence[torch.Tensor], index: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    out = passes[0].new_empty((len(index), *passes[0].shape[1:]))
    for position, rows in enumerate(passes):
        mask = choice == position
        out[mask] = rows[index[mask]]
    return out


class BatchedRows(Dataset):
    """A dataset of cached feature rows that hands the DataLoader a whole batch from one gather (`rows`).

    Why: the per-sample path (one Python `__getitem__` per sample, then stacking) costs more CPU per batch than a
    linear head's training step on cached features (README "Refactor check" has the run times before and after).
    The trainer's loader passes `collate_rows` for these datasets; `dataset[i]` still returns one sample.
    """

    def rows(self, index: torch.Tensor) -> tuple:
        """(view tensors [B, ...], labels [B] int64, indices [B] int64) for the sample indices `index`."""
        raise NotImplementedError

    @property
    def batchable(self) -> bool:
        return True

    def __getitems__(self, indices: Sequence[int]) -> tuple | list:
        if not self.batchable:  # one sample at a time, collated by the DataLoader's default
            return [self[i] for i in indices]
        return self.rows(torch.as_tensor(list(indices), dtype=torch.long))

    def __getitem__(self, index: int) -> tuple:
        *views, labels, indices = self.rows(torch.tensor([index]))
        return (*(v[0] for v in views), int(labels[0]), int(indices[0]))


def collate_rows(batch: tuple) -> tuple:
    """The DataLoader's collate for `BatchedRows`: the batch is already one."""
    return batch


class CachedPasses(BatchedRows):
    """Views as cached frozen-backbone feature passes: item -> (`num_views` rows of different passes, label, index).

    Each view of a sample is a different pass drawn at random (with replacement when there are fewer passes than
    views), so a pair of views is two different augmentations of one image, as on the image paths.
    """

    def __init__(self, passes: Sequence[np.ndarray | torch.Tensor], labels: np.ndarray, num_views: int = 2) -> None:
        self.passes = [torch.as_tensor(p) for p in passes]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.num_views = num_views

    def replace_pass(self, position: int, features: np.ndarray | torch.Tensor) -> None:
        """Swap one pass (CCES puts its ContrastiveCrop pass in place of the last plain one)."""
        self.passes[position] = torch.as_tensor(np.ascontiguousarray(features))

    def __len__(self) -> int:
        return int(self.passes[0].shape[0])

    def rows(self, index: torch.Tensor) -> tuple:
        count = len(self.passes)
        if count == 1:  # e.g. TURTLE's one clean pass
            return (*[self.passes[0][index]] * self.num_views, self.labels[index], index)
        if count >= self.num_views:  # distinct passes per sample: the first views of a random permutation
            choice = torch.rand(len(index), count).argsort(dim=1)[:, : self.num_views]
        else:
            choice = torch.randint(count, (len(index), self.num_views))
        views = [_rows_by_choice(self.passes, index, choice[:, v]) for v in range(self.num_views)]
        return (*views, self.labels[index], index)


def apply_batched(
    views: Sequence[nn.Module], inputs: Sequence[torch.Tensor], indices: torch.Tensor
) -> list[torch.Tensor]:
    """The device path: view i augments input i (or input 0 when the dataset yields one clean image per sample);
    `per_sample` views also get the sample indices."""
    out = []
    for position, view in enumerate(views):
        source = inputs[position] if len(inputs) == len(views) else inputs[0]
        out.append(view(source, indices) if getattr(view, "per_sample", False) else view(source))
    return out
