"""A method is a loss plus a view recipe (plus optional per-sample state); the one trainer runs them all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from training.data.views import Transform, cc_augment

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.models.heads import ClusteringModel
    from training.trainer import Trainer


@dataclass
class Batch:
    """What a method sees for one step: backbone features of each view (already encoded) and sample indices."""

    features: list[torch.Tensor]
    indices: torch.Tensor
    labels: torch.Tensor


class Method:
    """Base class. Subclasses set `name`, implement `loss`, and may override the views and the hooks."""

    name = "base"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def train_views(self) -> list[Transform]:
        size = self.config.data.image_size
        augment = cc_augment(size, self.config.data.augment_strength, self.config.data.min_crop_scale)
        return [augment, augment]

    def batch_views(self) -> list[torch.nn.Module]:
        """The same recipe applied to whole batches on the training device (`data.augment_on=device`)."""
        from training.data.batch_augment import BatchAugment

        d = self.config.data
        return [BatchAugment(d.image_size, d.augment_strength, d.min_crop_scale) for _ in range(2)]

    def loss(self, model: ClusteringModel, batch: Batch) -> dict[str, torch.Tensor]:
        """Return a dict with at least `loss` (the scalar to minimise); other entries are logged."""
        raise NotImplementedError

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called before each epoch (CCES refreshes its crop boxes here)."""

    def on_step_end(self, batch: Batch) -> None:  # noqa: B027 - optional hook
        """Called after the optimiser step (CCES enqueues features here)."""

    def state_dict(self) -> dict[str, Any]:
        """Per-method state saved in the checkpoint (tensors and plain containers only: weights_only loads)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `state_dict` saved."""


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
    return sorted(_METHODS)


def create_method(config: TrainConfig) -> Method:
    import training.methods  # noqa: F401 - registers the built-in methods

    name = config.method.name
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return _METHODS[name](config)
