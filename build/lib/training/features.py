"""Frozen-backbone features, computed once and cached on disk.

With a frozen pretrained backbone (EfficientNet-Lite0) the expensive part is the forward pass; heads train in
seconds on cached features. A cache entry is keyed by everything that changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.data.datasets import ImageDataset
from training.data.views import MultiView, Transform
from training.paths import cache_root

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed(
    backbone: torch.nn.Module,
    dataset: ImageDataset,
    transform: Transform,
    *,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
    device: str = "cpu",
    desc: str = "embed",
) -> np.ndarray:
    """Backbone features of every image under one transform (seeded, so augmented passes are reproducible)."""
    backbone.eval().to(device)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        MultiView(dataset, [transform]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
    )
    torch.manual_seed(seed)
    out = np.empty((len(dataset), backbone.feature_dim), dtype=np.float32)
    for images, _, index in tqdm(loader, desc=desc, unit="batch", mininterval=5):
        out[index.numpy()] = backbone(images.to(device)).float().cpu().numpy()
    return out


def _seed_worker(worker_id: int) -> None:
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def cached_embed(key: dict, compute: callable) -> np.ndarray:  # type: ignore[valid-type]
    """Return the cached array for `key`, computing and storing it (atomically) when missing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "features" / f"{digest}.npy"
    if path.exists():
        log.info("feature cache hit %s %s", path.name, key)
        return np.load(path)
    array = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps(key, sort_keys=True))
    return array


def frozen_features(
    backbone_name: str,
    dataset: ImageDataset,
    dataset_key: str,
    image_size: int,
    view: str = "clean",
    *,
    augment_strength: float = 0.5,
    min_scale: float = 0.2,
    batch_size: int = 128,
    workers: int = 2,
) -> np.ndarray:
    """Features of a frozen pretrained backbone: `view="clean"` is the serving transform; `"aug<i>"` is the i-th
    seeded pass of CC's augmentations (cached views give the contrastive methods their positive pairs)."""
    from training.data.views import cc_augment, eval_transform
    from training.models.backbones import create_backbone

    key = {
        "backbone": backbone_name,
        "dataset": dataset_key,
        "n": len(dataset),
        "size": image_size,
        "view": view,
        "strength": augment_strength if view != "clean" else None,
        "min_scale": min_scale if view != "clean" else None,
        "version": 1,
    }

    def compute() -> np.ndarray:
        backbone = create_backbone(backbone_name, pretrained=True)
        if view == "clean":
            transform, seed = eval_transform(image_size), 0
        else:
            transform = cc_augment(image_size, augment_strength, min_scale)
            seed = 1000 + int(view.removeprefix("aug"))
        return embed(
            backbone,
            dataset,
            transform,
            batch_size=batch_size,
            workers=workers,
            seed=seed,
            desc=f"{dataset_key}:{view}",
        )

    return cached_embed(key, compute)
