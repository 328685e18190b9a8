"""What a method is, and the narrow context it works with (never the trainer).

A method is a loss plus its view recipes, and, where its paper has stages, a sequence of stages (SCAN: pretext ->
mine -> cluster -> self-label). Every hook a method may implement is declared on `Method`, with a default that does
nothing; the trainer calls each of them, for every method alike. Methods see the run through `MethodContext`: the
model, the device and autocast, the datasets, named cached feature passes and `predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.views import Recipe, data_augmentation

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.models.heads import ClusteringModel


@dataclass
class Batch:
    """What a method sees for one step: backbone features of each view (already encoded) and sample indices."""

    features: list[torch.Tensor]
    indices: torch.Tensor
    labels: torch.Tensor


@dataclass
class MethodContext:
    """All a hook receives. `passes(dataset, names, strong=None)` gives named cached feature passes of a frozen
    backbone (`clean`, `augI`, `strongI`; see `training.data.views`); `transforms(recipes)` gives the per-sample
    transforms of recipes on this run's image path (the clean view when the trainer augments whole batches on the
    device); `predict(dataset)` gives (probabilities, embedding, labels) with the serving pre-processing (the
    evaluation set when `dataset` is None)."""

    config: TrainConfig
    model: ClusteringModel
    device: torch.device
    train_set: Dataset
    eval_set: Dataset
    cached: bool
    run_dir: Path
    autocast: Callable[[], AbstractContextManager]
    passes: Callable[..., list[np.ndarray]]
    transforms: Callable[[Sequence[Recipe]], list[Callable[..., torch.Tensor]]]
    predict: Callable[[Dataset | None], tuple[np.ndarray, np.ndarray, np.ndarray]]

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    @property
    def train_labels(self) -> np.ndarray:
        return np.asarray(self.train_set.labels)  # type: ignore[attr-defined]


class StopStage(RuntimeError):  # noqa: N818 - a signal, like StopIteration
    """Raised by a hook to end its stage early with a report (SCAN's self-labelling collapse guard). The trainer
    writes the report to `<stage>/stopped.json`, and the run's result is the last stage that finished."""

    def report(self) -> dict[str, Any]:
        return {"reason": str(self)}


class Method:
    """Base class. Subclasses set `name` (by `register_method`), implement `loss`, and may override any hook."""

    name = "base"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @classmethod
    def cluster_head(cls, config: TrainConfig, dims: list[int]) -> Callable[[], torch.nn.Module] | None:
        """A factory for this method's own cluster head over feature spaces of `dims` (None: the MLP head)."""
        return None

    # ------------------------------------------------------------------ what to train on
    def stages(self) -> list[Stage | StepStage]:
        """The method's stages in order; one training stage (the method itself, `optim.epochs`) by default."""
        o = self.config.optim
        assert o.epochs is not None and o.lr is not None  # set by the config for single-stage methods
        return [Stage("", self, o.epochs, o.lr)]

    def views(self) -> list[Recipe]:
        """The view recipes of one training sample (two views of the data config's augmentation by default)."""
        augment = data_augmentation(self.config.data)
        return [augment, augment]

    def train_data(self, ctx: MethodContext) -> Dataset | None:
        """A dataset of this method's own (SCAN's neighbour pairs), or None for the trainer's views of `views()`."""
        return None

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        """Return a dict with at least `loss` (the scalar to minimise); other entries are logged."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, ctx: MethodContext, epoch: int) -> None:
        """Before each epoch (CCES refreshes its crop boxes here)."""

    def on_step_end(self, batch: Batch) -> None:
        """After the optimiser step (CCES enqueues features here)."""

    def on_epoch_end(self, ctx: MethodContext, epoch: int, losses: dict[str, float]) -> None:
        """After each epoch, before its evaluation and checkpoint; may add entries to `losses` (logged)."""

    def summary(self, ctx: MethodContext) -> dict[str, Any]:
        """Extra entries for the run's final metrics (SCAN: neighbour agreement)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Per-method state saved in the checkpoint (tensors and plain containers only: weights_only loads)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""


@dataclass
class Stage:
    """A training stage: `method` trains for `epochs` at `lr` in `<run_dir>/<name>` (the run directory itself when
    `name` is empty: single-stage methods). A finished stage (its `final.pt` exists) is not trained again."""

    name: str
    method: Method
    epochs: int
    lr: float
    optimizer: str = "adam"  # "adam" or "sgd" (SCAN's official pretext)
    momentum: float = 0.9
    weight_decay: float | None = None  # None: optim.weight_decay
    schedule: str | None = None  # None: optim.schedule


@dataclass
class StepStage:
    """A stage without gradient steps (SCAN's mining): `compute(ctx, path)` writes the artifact at
    `<run_dir>/<artifact>` once (on the main process), `load(ctx, path)` reads it on every process."""

    name: str
    artifact: str
    compute: Callable[[MethodContext, Path], None]
    load: Callable[[MethodContext, Path], None]


MethodFactory = Callable[["TrainConfig"], Method]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def decorator(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = cls
        cls.name = name
        return cls

    return decorator


def available_methods() -> list[str]:
    import training.methods  # noqa: F401 - registers the built-in methods

    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    import training.methods  # noqa: F401 - registers the built-in methods

    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return _METHODS[name]  # type: ignore[return-value]


def create_method(config: TrainConfig) -> Method:
    import training.methods  # noqa: F401 - registers the built-in methods

    name = config.method.name
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return _METHODS[name](config)
