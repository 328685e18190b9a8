"""`deepclust train DIR`: from a folder nobody configured to a trained model, with every choice written down.

Three steps, each a plain function over data, so that each can be tested and overridden on its own:

1. `inspect_folder` measures the folder: image count, class sub-folders (ImageFolder layout) or flat, the typical
   shorter side of the images, the share of grey images (sampled files, decoded headers and pixels).
2. `pick` matches the measurements against `RULES` (first match wins) and returns the candidate recipes of that
   rule. A recipe (`RECIPES`) is a config fragment plus its default budget in *optimisation steps*; nothing in here
   names a dataset: only what was measured on the folder decides. When a rule lists two candidates the pick is
   "unsure" and `training.autorun` trains both and keeps the one a label-free criterion prefers.
3. `size` turns the budget (`Budget`: steps, or wall time such as `15m`) into each stage's epochs for this folder's
   size (epochs do not carry over between dataset sizes: 8 epochs of 60,000 images are 1,875 steps, of 10,000 images
   312). Wall time is converted with speeds measured on this machine when the run starts (`measure_speeds`).

Every choice lands in the run's `auto.json` with its reason; the CLI's `--recipe`, `--k`, `--budget` and dotted
`key=value` overrides replace any of them.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------------------ the folder
SAMPLE_FILES = 256  # files decoded to measure size and colour: enough for a median and a share
GREY_TOLERANCE = 2  # max |R-G|, |G-B| (of 255) for an RGB file to count as grey (JPEG chroma noise)


@dataclass(frozen=True)
class FolderFacts:
    """What `inspect_folder` measured. `classes` = number of class sub-folders (None for a flat folder)."""

    root: str
    images: int
    classes: int | None
    class_names: list[str] | None
    typical_side: int  # median shorter side of the sampled images, in pixels
    grey_share: float  # share of the sampled images whose pixels are grey
    sampled: int

    @property
    def grey(self) -> bool:
        return self.grey_share >= 0.9

    @property
    def labelled(self) -> bool:
        return bool(self.classes and self.classes >= 2)

    def describe(self) -> str:
        layout = f"{self.classes} class sub-folders" if self.labelled else "flat (no class sub-folders)"
        colour = "grey" if self.grey else "colour"
        side = self.typical_side
        return f"{self.images:,} images, {layout}, typical {side}x{side} px, {colour}"


def _is_grey(image: Image.Image) -> bool:
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool(
        np.abs(rgb[..., 0] - rgb[..., 1]).max() <= GREY_TOLERANCE
        and np.abs(rgb[..., 1] - rgb[..., 2]).max() <= GREY_TOLERANCE
    )


def inspect_folder(root: str | Path, sample: int = SAMPLE_FILES, seed: int = 0) -> FolderFacts:
    """Measure a folder the way `training.data.datasets.FolderDataset` will read it (the same files, the same
    layout rule: class sub-folders when the top level holds only folders)."""
    from training.data.datasets import FolderDataset

    root = Path(root)
    split_dir = root / "train"  # the folder dataset's rule: DIR/train when it exists
    dataset = FolderDataset(split_dir if split_dir.is_dir() else root)
    paths = dataset.paths
    picked = random.Random(seed).sample(range(len(paths)), min(sample, len(paths)))
    sides, grey = [], 0
    for index in picked:
        with Image.open(paths[index]) as image:
            sides.append(min(image.size))
            grey += _is_grey(image)
    names = dataset.class_names
    return FolderFacts(
        root=str(root),
        images=len(paths),
        classes=len(names) if names else None,
        class_names=list(names) if names else None,
        typical_side=int(np.median(sides)),
        grey_share=round(grey / max(len(picked), 1), 3),
        sampled=len(picked),
    )


# ------------------------------------------------------------------------------------------------ the budget
@dataclass(frozen=True)
class Budget:
    """Optimisation steps (`2000`, `2000steps`) or wall time (`900s`, `15m`, `1h`) for the whole command."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(steps?|s|sec|m|min|h)?\s*", text.lower())
        if not match:
            raise ValueError(f"budget must look like 2000 (steps), 900s, 15m or 1h, got {text!r}")
        value, unit = float(match.group(1)), match.group(2) or "steps"
        if value <= 0:
            raise ValueError(f"budget must be positive, got {text!r}")
        if unit.startswith("step"):
            return cls(steps=int(value))
        return cls(seconds=value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit])

    def describe(self) -> str:
        return f"{self.steps} optimisation steps" if self.steps else f"{self.seconds / 60:.3g} min of wall time"


DEFAULT_BUDGET = "12m"  # the ceiling is 15 min per folder on this machine: 3 min for start-up and export


# ------------------------------------------------------------------------------------------------ the recipes
@dataclass(frozen=True)
class Recipe:
    """A training recipe: a config fragment (the same keys as a YAML config) and its stages' default steps.

    `stage_steps` maps each trained stage to its share of the steps (the `epochs` field it sets in the config);
    `max_steps` is the most steps worth spending (beyond it the measured runs stopped improving), `min_steps` the
    fewest that make sense. `image_size` None means: the folder's own typical size (clamped to `size_range`).
    """

    name: str
    summary: str
    method: str
    backbone: str
    frozen: bool
    config: dict[str, Any]
    stage_steps: dict[str, tuple[str, float]]  # stage -> (config key "section.field" of its epochs, share)
    max_steps: int
    min_steps: int
    image_size: int | None = None
    size_range: tuple[int, int] = (8, 64)
    passes: tuple[str, ...] = ()  # cached frozen passes the recipe reads (extraction cost)
    max_epochs: int | None = None  # per stage: on a small folder many epochs cost more in per-epoch work than steps
    evidence: str = ""


RECIPES: dict[str, Recipe] = {
    "frozen-scan": Recipe(
        name="frozen-scan",
        summary="SCAN heads + self-labelling on cached features of a frozen ImageNet EfficientNet-Lite2 at 160 px",
        method="scan",
        backbone="effnet_lite2",
        frozen=True,
        image_size=160,
        config={
            "data": {"image_size": 160, "workers": 2, "augment_strength": 0.5, "min_crop_scale": 0.2},
            "model": {
                "backbone": "effnet_lite2",
                "pretrained": True,
                "freeze_backbone": True,
                "cached_features": True,
                "projection_dim": 128,
                "hidden_dim": 256,
                "num_cluster_heads": 2,
            },
            "optim": {"batch_size": 512, "weight_decay": 1.0e-4, "schedule": "cosine"},
            "method": {
                "name": "scan",
                "pretext": "auto",
                "neighbours": 20,
                "entropy_weight": 5.0,
                "scan_lr": 1.0e-3,
                "selflabel_lr": 1.0e-4,
                "selflabel_threshold": 0.9,
                "strong_passes": ["strong0", "strong1"],
            },
        },
        stage_steps={"scan": ("method.scan_epochs", 0.6), "selflabel": ("method.selflabel_epochs", 0.4)},
        max_steps=2500,
        min_steps=600,  # heads on cached features: milliseconds a step; 42 steps left SCAN's heads uniform (digits)
        passes=("clean", "strong0", "strong1"),
        max_epochs=60,  # 4x the measured config's 15 SCAN epochs; SCAN validates every head on every epoch
        evidence=(
            "configs/cifar10_lite0_scan.yaml (SCAN + self-label .636 on CIFAR-10, the served default) with Lite2, the "
            "space with the best k-means and kNN agreement of the three wheel-shipped spaces (NOTES.md); 1,455 + 970 "
            "steps there, 2,500 here"
        ),
    ),
    "scratch-cc": Recipe(
        name="scratch-cc",
        summary="CC with a small CNN trained from scratch at the images' own size (bf16, batched augmentation)",
        method="cc",
        backbone="small_cnn",
        frozen=False,
        config={
            "run": {"precision": "bf16"},
            "data": {
                "workers": 1,
                "augment_strength": 0.5,
                "min_crop_scale": 0.3,
                "augment_on": "device",
            },
            "model": {"backbone": "small_cnn", "pretrained": False, "projection_dim": 128},
            "optim": {"lr": 1.0e-3, "batch_size": 256, "schedule": "cosine"},
            "method": {"name": "cc", "instance_temperature": 0.5, "cluster_temperature": 1.0},
        },
        stage_steps={"": ("optim.epochs", 1.0)},
        max_steps=4000,
        min_steps=30,
        evidence=(
            "configs/fashion_mnist_cc.yaml; on a 10,000-image grey folder 312 steps gave ACC .467, 1,560 steps .698 "
            "(issue #19)"
        ),
    ),
}


# ------------------------------------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class Rule:
    """`test(facts)` true -> these candidate recipes (one: sure; several: chosen by a label-free criterion)."""

    name: str
    when: str
    test: Callable[[FolderFacts], bool]
    candidates: tuple[str, ...]
    why: str


MIN_IMAGES_FROM_SCRATCH = 1000  # below this a CNN from scratch has too little to learn from
SMALL_SIDE = 64  # "small" images: ImageNet backbones see them only after a large upsampling

RULES: tuple[Rule, ...] = (
    Rule(
        name="few-images",
        when=f"fewer than {MIN_IMAGES_FROM_SCRATCH:,} images",
        test=lambda f: f.images < MIN_IMAGES_FROM_SCRATCH,
        candidates=("frozen-scan",),
        why="too few images to train a network from scratch; pretrained features need no training",
    ),
    Rule(
        name="small-grey",
        when=f"grey images with a shorter side of at most {SMALL_SIDE} px",
        test=lambda f: f.grey and f.typical_side <= SMALL_SIDE,
        candidates=("frozen-scan", "scratch-cc"),
        why=(
            "unsure: ImageNet features were learnt on large colour photos and see these images only upsampled, "
            "while a small CNN from scratch is cheap at this size; both are trained and the more stable one kept"
        ),
    ),
    Rule(
        name="default",
        when="any other folder (colour or large images)",
        test=lambda f: True,
        candidates=("frozen-scan",),
        why="pretrained ImageNet features are the strongest representation we have for photos on a CPU",
    ),
)


@dataclass(frozen=True)
class Pick:
    rule: str
    when: str
    why: str
    candidates: tuple[str, ...]

    @property
    def unsure(self) -> bool:
        return len(self.candidates) > 1


def pick(facts: FolderFacts, only: list[str] | None = None) -> Pick:
    """The first rule that matches the folder; `only` (the user's `--recipe`) replaces its candidates."""
    rule = next(r for r in RULES if r.test(facts))
    if only:
        unknown = [name for name in only if name not in RECIPES]
        if unknown:
            raise ValueError(f"unknown recipe(s) {unknown}; available: {sorted(RECIPES)}")
        return Pick(
            rule.name, rule.when, f"chosen by the user (--recipe); the rule would pick {rule.candidates}", tuple(only)
        )
    return Pick(rule.name, rule.when, rule.why, rule.candidates)


# ------------------------------------------------------------------------------------------------ sizing
@dataclass(frozen=True)
class Speeds:
    """Measured on this machine when the run starts (so a loaded machine gets a smaller, honest budget)."""

    backbone_images_per_s: dict[str, float] = field(default_factory=dict)  # frozen forward, per backbone
    step_seconds: dict[str, float] = field(default_factory=dict)  # one optimisation step, per recipe


@dataclass(frozen=True)
class Sizing:
    recipe: str
    k: int
    image_size: int
    batch_size: int
    steps: int
    steps_per_epoch: int
    epochs: dict[str, int]
    seeds: int
    estimated_seconds: float
    why: str
    overrides: list[str]


def image_size_for(recipe: Recipe, facts: FolderFacts) -> int:
    if recipe.image_size is not None:
        return recipe.image_size
    low, high = recipe.size_range
    return int(min(max(facts.typical_side, low), high))


def batch_size_for(recipe: Recipe, images: int) -> int:
    """The recipe's batch, but never more than a quarter of the folder (a few steps per epoch; drop_last)."""
    wanted = int(recipe.config["optim"]["batch_size"])
    return int(max(2, min(wanted, 2 ** int(math.log2(max(images // 4, 2))))))


def size(
    recipe: Recipe,
    facts: FolderFacts,
    k: int,
    budget: Budget,
    speeds: Speeds,
    *,
    seeds: int = 1,
    share: float = 1.0,
    spent_seconds: float = 0.0,
    passes_to_compute: int | None = None,
) -> Sizing:
    """Steps, epochs and config overrides of `recipe` on this folder within its `share` of the budget.

    A steps budget is taken as given (clamped to the recipe's useful range). A time budget pays first for what
    cannot be cut (the frozen feature passes not in the cache yet: `passes_to_compute`, default all of the recipe's;
    `seeds` runs), then buys steps at the measured step time.
    """
    batch = batch_size_for(recipe, facts.images)
    per_epoch = max(facts.images // batch, 1)
    step_s = speeds.step_seconds.get(recipe.name, 0.01)
    fixed = 0.0
    if recipe.frozen:
        rate = speeds.backbone_images_per_s.get(recipe.backbone, 100.0)
        missing = len(recipe.passes) if passes_to_compute is None else passes_to_compute
        fixed = missing * facts.images / rate
    if budget.steps is not None:
        steps = budget.steps
        why = f"{budget.describe()} asked"
    else:
        assert budget.seconds is not None
        available = budget.seconds * share - spent_seconds - fixed
        steps = int(available / max(step_s * seeds, 1e-6))
        why = (
            f"{share:.0%} of {budget.describe()}: {fixed:.0f} s of frozen passes, then {step_s * 1000:.1f} ms per "
            f"step x {seeds} seed(s)"
        )
    clamped = int(min(max(steps, recipe.min_steps), recipe.max_steps))
    if clamped != steps:
        why += f"; {steps} steps clamped to the recipe's useful range [{recipe.min_steps}, {recipe.max_steps}]"
    epochs: dict[str, int] = {}
    overrides = [f"model.k={k}", f"optim.batch_size={batch}", f"data.image_size={image_size_for(recipe, facts)}"]
    for stage, (key, part) in recipe.stage_steps.items():
        epochs[stage or "train"] = max(1, math.ceil(clamped * part / per_epoch))
        if recipe.max_epochs and epochs[stage or "train"] > recipe.max_epochs:
            epochs[stage or "train"] = recipe.max_epochs
            why += f"; {stage or 'train'} capped at {recipe.max_epochs} epochs"
        overrides.append(f"{key}={epochs[stage or 'train']}")
    total_epochs = sum(epochs.values())
    every = max(1, total_epochs // 8)  # about eight evaluations and checkpoints per stage
    overrides += [f"run.eval_every={every}", f"run.checkpoint_every={every}"]
    if recipe.method == "scan":
        neighbours = int(min(20, max(2, facts.images // (3 * k))))
        overrides.append(f"method.neighbours={neighbours}")
    clamped = min(clamped, sum(epochs.values()) * per_epoch)  # the steps the epochs actually make
    estimated = fixed + clamped * step_s * seeds
    return Sizing(
        recipe=recipe.name,
        k=k,
        image_size=image_size_for(recipe, facts),
        batch_size=batch,
        steps=clamped,
        steps_per_epoch=per_epoch,
        epochs=epochs,
        seeds=seeds,
        estimated_seconds=round(estimated, 1),
        why=why,
        overrides=overrides,
    )


def recipe_config(recipe: Recipe, root: str | Path, out_dir: str, name: str, seed: int) -> dict[str, Any]:
    """The recipe's config as a YAML-shaped dict for this folder (before the sizing's and the user's overrides)."""
    import copy

    data = copy.deepcopy(recipe.config)
    data.setdefault("data", {}).update({"dataset": "folder", "root": str(root)})
    data.setdefault("run", {}).update({"out_dir": out_dir, "name": name, "seed": seed})
    return data


# ------------------------------------------------------------------------------------------------ measuring
def measure_backbone(name: str, image_size: int, batch: int = 32) -> float:
    """Images per second of a frozen backbone's forward at `image_size` (one warm-up batch, one timed batch)."""
    import torch

    from training.models.backbones import create_backbone

    model = create_backbone(name, pretrained=False).eval()
    images = torch.rand(batch, 3, image_size, image_size)
    with torch.inference_mode():
        model(images[:4])
        started = time.perf_counter()
        model(images)
    return batch / max(time.perf_counter() - started, 1e-6)


def measure_step(config: Any, repeats: int = 3) -> float:
    """Seconds of one optimisation step of `config`'s model and method on random inputs of its size (two views;
    with cached features the inputs are feature vectors)."""
    import torch

    from training.methods.base import Batch, create_method
    from training.trainer import build_model

    model = build_model(config)
    method = create_method(config)
    b, s = config.optim.batch_size, config.data.image_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    if config.model.cached_features:
        model.backbone.eval()

        def encode(x: torch.Tensor) -> torch.Tensor:
            return x

        views = [torch.randn(b, model.feature_dim) for _ in range(2)]
    else:

        def encode(x: torch.Tensor) -> torch.Tensor:
            return model.backbone(x)

        views = [torch.rand(b, 3, s, s) for _ in range(2)]
    if config.method.name == "scan":  # SCAN's clustering stage: the loss of the staged method's clustering part
        from training.methods.scan import SCANClustering

        method = SCANClustering(config)
    enabled = config.run.precision == "bf16"
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            batch = Batch([encode(v) for v in views], torch.arange(b), torch.zeros(b, dtype=torch.long))
            loss = method.loss(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    augment = 1.0 if config.model.cached_features else 1.5  # batched augmentation on the device, measured ~1.3-1.6x
    return float(np.median(times[1:])) * augment


def to_json(value: Any) -> Any:
    """Dataclasses (and tuples) as JSON-ready values for auto.json."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: to_json(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


__all__ = [
    "Budget",
    "FolderFacts",
    "Pick",
    "RECIPES",
    "RULES",
    "Recipe",
    "Rule",
    "Sizing",
    "Speeds",
    "inspect_folder",
    "measure_backbone",
    "measure_step",
    "pick",
    "recipe_config",
    "size",
]
