"""View recipes: how a method turns one image into the tensors it trains on.

All views produce float RGB tensors in [0, 1] (grey images are replicated to RGB, matching the serving contract);
backbones normalise internally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from serving.core.preprocess import resize_for_model

Transform = Callable[[Image.Image], torch.Tensor]


def _to_rgb() -> T.Transform:
    return T.Lambda(lambda im: im.convert("RGB") if isinstance(im, Image.Image) and im.mode != "RGB" else im)


def _to_tensor() -> list[T.Transform]:
    return [T.PILToTensor(), T.ToDtype(torch.float32, scale=True)]


def cc_augment(size: int, strength: float = 0.5, min_scale: float = 0.08) -> T.Compose:
    """CC's augmentations: RandomResizedCrop, flip, ColorJitter(0.8s,0.8s,0.8s,0.2s) p=0.8, grayscale p=0.2."""
    s = strength
    return T.Compose(
        [
            _to_rgb(),
            T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            T.RandomGrayscale(p=0.2),
            *_to_tensor(),
        ]
    )


def simclr_augment(size: int, min_scale: float = 0.2) -> T.Compose:
    """SimCLR's CIFAR recipe (SCAN's pretext): crop, flip, ColorJitter(0.4,0.4,0.4,0.1) p=0.8, grayscale p=0.2."""
    return T.Compose(
        [
            _to_rgb(),
            T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            *_to_tensor(),
        ]
    )


def weak_augment(size: int) -> T.Compose:
    """Weak view for SCAN self-labelling: flip and a mild crop."""
    return T.Compose(
        [
            _to_rgb(),
            T.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            *_to_tensor(),
        ]
    )


def strong_augment(size: int, cutout_scale: tuple[float, float] = (0.02, 0.15)) -> T.Compose:
    """Strong view for SCAN self-labelling: RandAugment + Cutout (random erasing with zeros)."""
    return T.Compose(
        [
            _to_rgb(),
            T.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandAugment(num_ops=2, magnitude=10),
            *_to_tensor(),
            T.RandomErasing(p=1.0, scale=cutout_scale, value=0.0),
        ]
    )


def eval_transform(size: int) -> Transform:
    """Exactly the serving pre-processing (bicubic resize, no crop), as a float tensor."""

    def transform(image: Image.Image) -> torch.Tensor:
        array = resize_for_model(image, size)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)

    return transform


class MultiView(Dataset):
    """Wraps a dataset: item -> (view_1, ..., view_n, label, index). The index lets methods keep per-sample state."""

    def __init__(self, base: Dataset, transforms: Sequence[Transform]) -> None:
        self.base = base
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        image, label = self.base[index]
        # `per_sample` transforms (ContrastiveCrop) are called with the sample index too
        views = (t(image, index) if getattr(t, "per_sample", False) else t(image) for t in self.transforms)
        return (*views, label, index)
