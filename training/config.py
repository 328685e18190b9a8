"""Typed configuration (pydantic), loadable from YAML, overridable from the CLI with dotted `key=value` pairs.

A method's own settings live in its config class; `MethodConfig` is the tagged union of all of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    dataset: str = "cifar10"
    root: str | None = None
    train_split: Literal["train", "test", "train+test"] = Field(
        "train", description="the protocol: what is trained on and what is evaluated (official CC: train+test both)"
    )
    eval_split: Literal["train", "test", "train+test"] = "test"
    image_size: int = Field(32, ge=8, le=1024)
    workers: int = Field(2, ge=0)
    subset: int | None = Field(None, ge=2, description="train on a fixed random subset (small configs and tests)")
    eval_subset: int | None = Field(None, ge=2)
    augment_strength: float = Field(0.5, ge=0.0, le=1.0)
    min_crop_scale: float = Field(0.08, gt=0.0, le=1.0)
    augment_on: Literal["loader", "device"] = Field(
        "loader", description="per-image PIL augmentation in DataLoader workers, or batched on the training device"
    )


class ModelConfig(_Strict):
    backbone: str | list[str] = Field(
        "resnet18", description="a backbone name, or several frozen ones as one model (each space L2-normalised)"
    )
    stem: Literal["cifar", "imagenet"] = "cifar"
    pretrained: bool = True
    freeze_backbone: bool = False
    trainable_blocks: int = Field(0, ge=0, description="EfficientNet stages left trainable when frozen")
    cached_features: bool = Field(False, description="train heads on cached frozen-backbone features")
    feature_views: int = Field(2, ge=1, description="cached augmented passes per image (cached_features)")
    k: int = Field(10, ge=2)
    projection_dim: int = Field(128, ge=2)
    hidden_dim: int | None = None
    num_cluster_heads: int = Field(1, ge=1)
    sync_batchnorm: bool = Field(
        False, description="torchrun on GPUs: SyncBatchNorm in the backbone (BN statistics over the global batch)"
    )

    @property
    def backbone_name(self) -> str:
        """One string for logs, metadata and results rows ("a+b" for several spaces)."""
        return self.backbone if isinstance(self.backbone, str) else "+".join(self.backbone)

    @model_validator(mode="after")
    def _cached_needs_frozen(self) -> ModelConfig:
        if isinstance(self.backbone, list) and len(self.backbone) > 1 and not self.freeze_backbone:
            raise ValueError("several backbones are supported as frozen feature spaces only (freeze_backbone=true)")
        if self.cached_features and (not self.freeze_backbone or self.trainable_blocks):
            raise ValueError("cached_features needs freeze_backbone=true and trainable_blocks=0")
        return self


DEFAULT_EPOCHS, DEFAULT_LR = 100, 3e-4


class OptimConfig(_Strict):
    lr: float | None = Field(None, gt=0, description=f"single-stage methods (default {DEFAULT_LR}); SCAN: per stage")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=2)
    epochs: int | None = Field(
        None, ge=1, description=f"single-stage methods (default {DEFAULT_EPOCHS}); SCAN: per stage"
    )
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = Field(0, ge=0)


class CCConfig(_Strict):
    name: Literal["cc"] = "cc"
    instance_temperature: float = Field(0.5, gt=0)
    cluster_temperature: float = Field(1.0, gt=0)


class SCANConfig(_Strict):
    """SCAN (Van Gansbeke et al., ECCV 2020): pretext -> mine -> scan -> selflabel, each stage its own artifact.

    The number of cluster heads trained at once is `model.num_cluster_heads` (one place, so every stage's checkpoint
    has the same model). Each stage has its own epochs and learning rate here: `optim.epochs` and `optim.lr` do not
    apply to SCAN and are refused when set.
    """

    name: Literal["scan"] = "scan"
    pretext: Literal["auto", "simclr", "skip"] = Field(
        "auto", description="auto: SimCLR unless the backbone is pretrained and frozen"
    )
    pretext_temperature: float = Field(0.1, gt=0)
    pretext_epochs: int = Field(100, ge=1)
    pretext_optimizer: Literal["sgd", "adam"] = Field("sgd", description="official: SGD, momentum .9, cosine")
    pretext_lr: float = Field(0.4, gt=0)
    pretext_momentum: float = Field(0.9, ge=0, lt=1)
    pretext_weight_decay: float = Field(1e-4, ge=0)
    pretext_schedule: Literal["constant", "cosine"] = "cosine"
    neighbours: int = Field(20, ge=1, description="top-k cosine neighbours mined per sample")
    neighbours_include_self: bool = Field(
        True, description="official: a sample's partner is drawn from its k neighbours and itself"
    )
    mine_on: Literal["auto", "backbone", "projection"] = Field(
        "auto", description="auto: backbone features when pretext is skipped, else the SimCLR projection"
    )
    entropy_weight: float = Field(5.0, ge=0, description="lambda of the -H(mean p) term")
    scan_epochs: int = Field(50, ge=1)
    scan_lr: float = Field(1e-4, gt=0)
    selflabel_epochs: int = Field(50, ge=0, description="0 skips self-labelling")
    selflabel_lr: float = Field(1e-4, gt=0)
    selflabel_threshold: float = Field(0.99, gt=0, lt=1)
    strong_passes: list[str] = Field(
        default_factory=lambda: ["strong0", "strong1"],
        description="cached features only: passes of the strong view (strongI) for clustering and self-labelling",
    )
    cutout_fraction: float = Field(0.5, ge=0, le=1, description="largest Cutout side, as a fraction of the image")
    collapse_share: float = Field(
        0.5, gt=0, le=1, description="self-labelling stops when one cluster takes more than this share of samples"
    )


class CCESConfig(_Strict):
    """CCES (Yin, Wu, Sun, Information Fusion 2023): CC + ContrastiveCrop + nearest neighbours from a FIFO support
    set of backbone features. `nn=none, ccrop=false` is CC (with these temperatures).

    Neighbour modes (the paper's Sec. 4.4 and Table 4): the neighbour NN(xi1) of view 1 takes view 1's place in the
    instance-level loss only (`single1`), in the cluster-level loss only (`single2`), or in both (`double`).
    ContrastiveCrop's warm-up and box refresh are shares of `optim.epochs` (official ContrastiveCrop CIFAR config:
    100 of 500 epochs each, alpha 0.1, threshold 0.1), so they scale with the budget.
    """

    name: Literal["cces"] = "cces"
    instance_temperature: float = Field(0.2, gt=0, description="tau_R")
    cluster_temperature: float = Field(1.0, gt=0, description="tau_C")
    nn: Literal["none", "single1", "single2", "double"] = Field(
        "double", description="where NN(xi1) replaces view 1: none, instance loss, cluster loss, or both"
    )
    ccrop: bool = Field(True, description="ContrastiveCrop boxes from heat maps instead of plain RandomResizedCrop")
    queue_size: int = Field(65_536, ge=1, description="support set size h")
    warmup_share: float = Field(0.2, ge=0, le=1, description="share of the epochs with plain crops before boxes")
    update_share: float = Field(0.2, gt=0, le=1, description="share of the epochs between box updates")
    box_threshold: float = Field(0.1, ge=0, lt=1, description="heat-map threshold of the box")
    beta_alpha: float = Field(0.1, gt=0, description="Beta(alpha, alpha) of the crop centre inside the box")


class TurtleConfig(_Strict):
    """TURTLE (Gadetsky, Jiang, Brbic, ICML 2024) on cached frozen features: a task encoder (one weight-normed linear
    map per space) trained so that per-space linear classifiers, fitted for `inner_steps` steps on its labels, fit them
    well, with entropy weight `gamma`. Outer steps are the trainer's: Adam at `optim.lr` on batches of
    `optim.batch_size` (official: 1e-3, 10,000). Defaults are the official run_turtle.py settings except
    `preprocess` (official: none; here each space standardised per dimension, see the README)."""

    name: Literal["turtle"] = "turtle"
    gamma: float = Field(10.0, ge=0, description="entropy regulariser weight")
    inner_steps: int = Field(10, ge=1, description="M: inner Adam steps of the per-space classifiers")
    inner_lr: float = Field(1e-3, gt=0)
    preprocess: Literal["none", "l2", "standardise"] = "standardise"
    combine: Literal["mean_probs", "sum_logits"] = Field("mean_probs", description="official: mean of space softmaxes")


MethodConfig = Annotated[CCConfig | CCESConfig | SCANConfig | TurtleConfig, Field(discriminator="name")]


class RunConfig(_Strict):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="autocast: auto = bf16 on CUDA, fp32 on CPU; bf16 also pays off on CPUs with AVX512-BF16"
    )
    channels_last: bool = True
    checkpoint_every: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)


class TrainConfig(_Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    method: MethodConfig = CCConfig()

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    @model_validator(mode="after")
    def _no_dead_fields(self) -> TrainConfig:
        """SCAN's stages carry their own epochs and learning rates: `optim.epochs`/`optim.lr` would do nothing there,
        so they are refused; single-stage methods get the defaults when they leave them out."""
        o = self.optim
        if isinstance(self.method, SCANConfig):
            staged = [name for name in ("epochs", "lr") if getattr(o, name) is not None]
            if staged:
                raise ValueError(
                    f"optim.{'/'.join(staged)} do not apply to SCAN: each stage has its own "
                    "(method.pretext_epochs/scan_epochs/selflabel_epochs, method.pretext_lr/scan_lr/selflabel_lr)"
                )
        else:
            o.epochs = DEFAULT_EPOCHS if o.epochs is None else o.epochs
            o.lr = DEFAULT_LR if o.lr is None else o.lr
        return self

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`["optim.lr=1e-3", "method.name=cces"]` applied to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override must look like key.sub=value, got {item!r}")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping")
        data = loaded
    return TrainConfig.model_validate(apply_overrides(data, overrides or []))
