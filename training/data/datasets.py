"""Datasets in a registry: CIFAR-10 (JPEG tars), Fashion-MNIST (idx), sklearn digits, any image folder.

Nothing is downloaded: everything comes from `../shared/data` (or `$DEEPCLUST_DATA`) or from an installed package.
Labels are for evaluation only; a flat folder has none (label -1).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from serving.core.preprocess import DecodeLimits, ImageError, decode_image
from training.paths import cache_root, data_root

log = logging.getLogger("deepclust.data")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
UNLABELLED = -1


class ImageDataset(Dataset):
    """Images as PIL (RGB or L) with integer labels (-1 when unknown) and optional class names.

    `fingerprint` names the images themselves (not how they were asked for): two datasets with the same fingerprint
    hold the same images in the same order, so a feature pass computed for one serves the other (a folder used for
    both training and evaluation is embedded once).
    """

    labels: np.ndarray
    class_names: list[str] | None
    mode: str  # "RGB" or "L"
    fingerprint: str = ""

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), int(self.labels[index])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all()) and len(self) > 0


class ArrayDataset(ImageDataset):
    """Decoded uint8 images held in memory ([N,H,W] grey or [N,H,W,3] RGB): cheap for DataLoader workers."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, class_names: list[str] | None, fingerprint: str = ""
    ) -> None:
        self.images = images
        self.labels = labels.astype(np.int64)
        self.class_names = class_names
        self.mode = "L" if images.ndim == 3 else "RGB"
        self.fingerprint = fingerprint or f"array:{hashlib.sha256(images.tobytes()).hexdigest()[:16]}"

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode=self.mode)


class FolderDataset(ImageDataset):
    """Files decoded on demand (ImageFolder layout gives labels; a flat folder gives none).

    Decoded by serving's own decoder (`serving.core.preprocess.decode_image`: EXIF orientation, first frame,
    transparency on white, 16-bit grey rescaled, the same size limits), so a model is trained on the pixels it will
    be served. Files the decoder would refuse from their header (empty, not an image, over the limits) are left out
    at construction and listed in `skipped` with the reason, with one warning: one bad file does not stop a run.
    """

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files = _image_files(root, recursive=False)
        if class_dirs and not files:  # ImageFolder layout: one class per sub-folder
            groups: dict[str | None, list[Path]] = {d.name: _image_files(d, recursive=True) for d in class_dirs}
        else:
            groups = {None: _image_files(root, recursive=True)}
        refused = {p: why for found in groups.values() for p in found if (why := _refused_by_header(p))}
        self.skipped = {str(p.relative_to(root)): why for p, why in refused.items()}
        # A class sub-folder without one readable image is no class (it would count in K and never be found).
        groups = {name: kept for name, found in groups.items() if (kept := [p for p in found if p not in refused])}
        self.class_names = [str(name) for name in groups] if None not in groups else None
        pairs = [
            (p, UNLABELLED if name is None else i) for i, (name, found) in enumerate(groups.items()) for p in found
        ]
        if refused:
            shown = "; ".join(f"{name} ({why})" for name, why in list(self.skipped.items())[:5])
            more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
            log.warning(
                "skipped %d of %d files under %s: %s%s", len(refused), len(refused) + len(pairs), root, shown, more
            )
        if not pairs:
            raise ValueError(f"no readable images found under {root}")
        self.root = root
        self.paths = [p for p, _ in pairs]
        self.labels = np.array([label for _, label in pairs], dtype=np.int64)
        self.mode = "RGB"
        self.fingerprint = folder_fingerprint(root, self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            return decode_image(path.read_bytes())
        except ImageError as exc:  # passed the header check, broken further in: name the file
            raise ValueError(f"{path}: {exc}; fix or remove the file and run again") from exc


def _refused_by_header(path: Path) -> str | None:
    """Why the serving decoder would refuse this file, judged from its size and header alone (cheap: no pixels are
    decoded), or None."""
    limits, size = DecodeLimits(), path.stat().st_size
    if size == 0:
        return "empty"
    if size > limits.max_bytes:
        return f"{size} bytes, over the {limits.max_bytes} limit"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Exception as exc:  # noqa: BLE001 - any reason Pillow cannot read the header
        return f"not a readable image ({type(exc).__name__})"
    if width * height > limits.max_pixels:
        return f"{width}x{height} pixels, over the {limits.max_pixels} limit"
    return None


def folder_fingerprint(root: Path, paths: list[Path]) -> str:
    """Files' relative names, sizes and modification times: changes when any image is added, removed or replaced."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"\0{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return f"folder:{digest.hexdigest()[:16]}"


def base_and_index(dataset: Dataset) -> tuple[ImageDataset, np.ndarray | None]:
    """(the full dataset, positions of a `Subset` in it, or None): caches hold whole datasets, subsets index them."""
    if isinstance(dataset, Subset):
        return dataset.dataset, np.asarray(dataset.indices)  # type: ignore[return-value]
    return dataset, None  # type: ignore[return-value]


def fixed_subset(dataset: ImageDataset, n: int | None, seed: int) -> Dataset:
    """A fixed random subset of `n` samples (all when `n` is None), keeping `labels` and `class_names`."""
    if n is None or n >= len(dataset):
        return dataset
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    subset = Subset(dataset, chosen.tolist())
    subset.labels = dataset.labels[chosen]  # type: ignore[attr-defined]
    subset.class_names = dataset.class_names  # type: ignore[attr-defined]
    return subset


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: numpy and `random` seeded from the worker's torch seed (reproducible views)."""
    import random

    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _image_files(root: Path, recursive: bool) -> list[Path]:
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


DatasetFactory = Callable[..., ImageDataset]
_DATASETS: dict[str, DatasetFactory] = {}


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    def decorator(factory: DatasetFactory) -> DatasetFactory:
        _DATASETS[name] = factory
        return factory

    return decorator


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


class JoinedDataset(ImageDataset):
    """Several datasets as one, in order (official CC trains and evaluates on CIFAR-10 train + test)."""

    def __init__(self, parts: list[ImageDataset]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        self.labels = np.concatenate([p.labels for p in parts])
        self.class_names = parts[0].class_names
        self.mode = parts[0].mode
        self.fingerprint = "+".join(p.fingerprint for p in parts)

    def load(self, index: int) -> Image.Image:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part].load(index - int(self.offsets[part]))


SPLITS = ("train", "test", "train+test")


def create_dataset(name: str, split: str = "train", root: str | Path | None = None) -> ImageDataset:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {available_datasets()}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "train+test":
        train, test = (_DATASETS[name](split=part, root=root) for part in ("train", "test"))
        return train if train.fingerprint == test.fingerprint else JoinedDataset([train, test])  # a folder: one set
    return _DATASETS[name](split=split, root=root)


@dataclass(frozen=True)
class _Cached:
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    digest: str


def _cifar_arrays(split: str, root: Path) -> _Cached:
    """Decode the JPEG tar once into a cached .npz (50k JPEGs decode in ~15 s; the cache loads in <1 s)."""
    tar_path = root / "cifar10" / f"{split}.tar"
    if not tar_path.exists():
        raise FileNotFoundError(f"CIFAR-10 {split} tar not found at {tar_path} (set DEEPCLUST_DATA)")
    digest = hashlib.sha256(f"{tar_path.name}:{tar_path.stat().st_size}".encode()).hexdigest()[:12]
    cache = cache_root() / "data" / f"cifar10-{split}-{digest}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return _Cached(z["images"], z["labels"], [str(c) for c in z["class_names"]], digest)
    records: list[tuple[str, str, bytes]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            parts = Path(member.name).parts
            handle = tar.extractfile(member)
            if handle is None:
                continue
            records.append((parts[-2], member.name, handle.read()))
    records.sort(key=lambda r: r[1])
    class_names = sorted({r[0] for r in records})
    index = {c: i for i, c in enumerate(class_names)}
    import io

    images = np.stack([np.asarray(Image.open(io.BytesIO(r[2])).convert("RGB")) for r in records])
    labels = np.array([index[r[0]] for r in records], dtype=np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, labels=labels, class_names=np.array(class_names))
    tmp.replace(cache)
    return _Cached(images, labels, class_names, digest)


@register_dataset("cifar10")
def cifar10(split: str, root: str | Path | None = None) -> ImageDataset:
    cached = _cifar_arrays(split, Path(root) if root else data_root())
    return ArrayDataset(cached.images, cached.labels, cached.class_names, f"cifar10:{split}:{cached.digest}")


FASHION_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@register_dataset("fashion_mnist")
def fashion_mnist(split: str, root: str | Path | None = None) -> ImageDataset:
    base = (Path(root) if root else data_root()) / "fashion-mnist"
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(base / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(base / f"{prefix}-labels-idx1-ubyte.gz")
    return ArrayDataset(
        np.ascontiguousarray(images), labels.astype(np.int64), FASHION_CLASSES, f"fashion_mnist:{split}"
    )


@register_dataset("digits")
def digits(split: str, root: str | Path | None = None) -> ImageDataset:
    """sklearn's 1,797 8x8 digits (installed with scikit-learn); a fixed 80/20 split for train/test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    chosen = order[:cut] if split == "train" else order[cut:]
    return ArrayDataset(images[chosen], bunch.target[chosen], [str(i) for i in range(10)], f"digits:{split}")


@register_dataset("folder")
def folder(split: str, root: str | Path | None = None) -> ImageDataset:
    if root is None:
        raise ValueError("dataset 'folder' needs data.root (an ImageFolder layout or a flat folder of images)")
    root = Path(root)
    split_dir = root / split
    return FolderDataset(split_dir if split_dir.is_dir() else root)
