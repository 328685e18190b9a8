"""Frozen-backbone feature passes, computed once and cached on disk.

With a frozen pretrained backbone the expensive part is the forward pass; heads train in seconds on cached features.
`feature_key` is the one place that says what a pass depends on: the backbone and its weights, the images (the
dataset's fingerprint, not its name or split), the view recipe with every parameter, the seed and the input size.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.data.datasets import ImageDataset, seed_worker
from training.data.views import Clean, MultiView, Recipe, Strong, Transform, eval_transform
from training.paths import cache_root

log = logging.getLogger(__name__)

KEY_VERSION = 2

Engine = Literal["auto", "torch", "onnxruntime"]
# An onnxruntime pass must reproduce torch's features to float rounding, or the pass falls back to torch.
PARITY_TOLERANCE = 1e-4


def feature_key(
    backbone: str, pretrained: bool, dataset: ImageDataset, recipe: Recipe | str, seed: int, input_size: int
) -> dict[str, Any]:
    """Everything that changes a cached pass's numbers (`recipe` may be a name for non-view arrays: heat maps)."""
    return {
        "backbone": backbone,
        "pretrained": pretrained,
        "dataset": dataset.fingerprint or f"unnamed:{len(dataset)}",
        "n": len(dataset),
        "recipe": recipe.key() if isinstance(recipe, Recipe) else recipe,
        "seed": seed,
        "input_size": input_size,
        "version": KEY_VERSION,
    }


def cached_array(key: dict[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The cached array for `key`, computed and stored (atomically, with the key beside it) when missing."""
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
    path.with_suffix(".json").write_text(json.dumps(key, sort_keys=True))
    return array


def onnx_forward(backbone: torch.nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], np.ndarray] | None:
    """The frozen backbone as an onnxruntime session on the CPU, or None when it cannot be one.

    Why: a whole pass ran 1.35-1.4× (Lite0) and 1.5-1.6× (Lite2) faster on onnxruntime than torch eager here
    (`benchmarks/extract_speed.py`), and a frozen pass is nothing but forward calls. The session uses torch's thread
    count (so `OMP_NUM_THREADS` and the cgroup-aware default apply to both) and is checked against torch on `example`:
    outside `PARITY_TOLERANCE` (relative to the features' scale) the caller keeps torch. The module is left in eval
    mode; callers restore their own.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    # Eval mode before the export: the exporter restores the module's own mode afterwards, so a wrapper built in
    # training mode would switch the backbone's batch norms to training (batch statistics, moving running means).
    backbone.eval()
    buffer = io.BytesIO()
    try:
        torch.onnx.export(
            backbone,
            (example,),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
        )
    except Exception as error:  # noqa: BLE001 - any export failure means "use torch", said in the log
        log.warning("feature pass on torch: the backbone does not export to ONNX (%s)", error)
        return None
    import onnx

    from training.onnx_graph import fold_pad_amounts

    graph = onnx.load_from_string(buffer.getvalue())
    folded = fold_pad_amounts(graph, example[:1].numpy())  # TF-"SAME" pads fused into the Convs, not a pass apart
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def forward(images: torch.Tensor) -> np.ndarray:
        return session.run(None, {"images": images.contiguous().numpy()})[0]

    reference = backbone(example).float().numpy()
    error = float(np.abs(forward(example) - reference).max()) / max(1.0, float(np.abs(reference).max()))
    if not error <= PARITY_TOLERANCE:
        log.warning("feature pass on torch: onnxruntime differs from torch by %.2e (relative)", error)
        return None
    log.info(
        "feature pass on onnxruntime (%d threads; %d pad amounts folded; relative difference to torch %.1e)",
        torch.get_num_threads(),
        folded,
        error,
    )
    return forward


@torch.inference_mode()
def embed(
    backbone: torch.nn.Module,
    dataset: ImageDataset,
    transform: Transform,
    *,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "embed",
    batch_augment: torch.nn.Module | None = None,
    engine: Engine = "auto",
) -> np.ndarray:
    """Backbone features of every image under one transform, optionally followed by a batched augmentation
    (seeded, so augmented passes are reproducible). Runs under a forked RNG: a pass computed mid-training (a cache
    miss) leaves the training random stream alone. `engine="auto"` runs the backbone on onnxruntime on a CPU (checked
    against torch on the first batch) and on torch elsewhere."""
    was_training = backbone.training
    backbone.eval().to(device)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        MultiView(dataset, [transform]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        generator=generator,
        worker_init_fn=seed_worker,
        persistent_workers=False,
    )
    on_cpu = torch.device(device).type == "cpu"
    if engine == "onnxruntime" and not on_cpu:
        raise ValueError(f"engine='onnxruntime' runs on the CPU; device is {device}")
    use_onnx = on_cpu and engine != "torch"
    forward: Callable[[torch.Tensor], np.ndarray] | None = None
    out = np.empty((len(dataset), backbone.feature_dim), dtype=np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for images, _, index in tqdm(loader, desc=desc, unit="batch", mininterval=2, dynamic_ncols=True):
            images = images.to(device)
            if batch_augment is not None:
                batch_augment = batch_augment.to(device)
                images = (
                    batch_augment(images, index)
                    if getattr(batch_augment, "per_sample", False)
                    else batch_augment(images)
                )
            if forward is None:
                onnx = onnx_forward(backbone, images[:8]) if use_onnx else None
                if engine == "onnxruntime" and onnx is None:
                    raise RuntimeError("engine='onnxruntime' asked, but the backbone cannot run on it (see the log)")
                forward = onnx or (lambda batch: backbone(batch).float().cpu().numpy())
            out[index.numpy()] = forward(images)
    backbone.train(was_training)
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers, in order (names a backbone that no registry entry names)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def native_size(dataset: ImageDataset) -> int:
    """Side of the first image: strong views run their ops at the images' own resolution (others are resized to it)."""
    return int(np.asarray(dataset[0][0]).shape[0])


def frozen_pass(
    backbone_name: str,
    dataset: ImageDataset,
    recipe: Recipe,
    seed: int = 0,
    *,
    pretrained: bool = True,
    backbone: torch.nn.Module | None = None,
    workers: int = 2,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Features of `dataset` under one seeded pass of `recipe` through a frozen backbone (cached).

    The images enter at the recipe's size after the serving resize (strong views: at their own resolution) and the
    recipe's batched form augments them; `backbone` may be passed to reuse one already built.
    """
    from training.models.backbones import create_backbone

    input_size = native_size(dataset) if isinstance(recipe, Strong) else recipe.size  # type: ignore[attr-defined]
    key = feature_key(backbone_name, pretrained, dataset, recipe, seed, input_size)
    if not pretrained and backbone is not None:  # randomly initialised weights: the key must name these weights
        key["weights"] = weights_digest(backbone)

    def compute() -> np.ndarray:
        model = backbone if backbone is not None else create_backbone(backbone_name, pretrained=pretrained)
        augment = None if isinstance(recipe, Clean) else recipe.batched()
        return embed(
            model,
            dataset,
            eval_transform(input_size),
            batch_size=batch_size,
            workers=workers,
            seed=seed,
            device=device,
            desc=f"features {dataset.fingerprint.split(':')[0]} {recipe.kind} seed {seed}",
            batch_augment=augment,
        )

    return cached_array(key, compute)
