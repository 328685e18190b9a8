"""CC's augmentations on a whole batch of tensors at once (on the GPU, or vectorised on the CPU).

Per-image PIL augmentation costs about a millisecond per view on this CPU and dominates small-image training;
doing the same operations per sample but batched (one affine grid for crop + flip, arithmetic colour jitter) is
an order of magnitude cheaper and moves to the GPU with the batch. Every sample draws its own parameters.
Hue is shifted by a rotation in YIQ space (a close, vectorisable stand-in for torchvision's HSV hue shift).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


class BatchAugment(nn.Module):
    """RandomResizedCrop + horizontal flip + ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p + grayscale with p."""

    def __init__(
        self,
        size: int,
        strength: float = 0.5,
        min_scale: float = 0.08,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
    ) -> None:
        super().__init__()
        self.size = size
        self.min_scale = min_scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        s = strength
        self.brightness, self.contrast, self.saturation, self.hue = 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s
        self.jitter_p = jitter_p
        self.grayscale_p = grayscale_p
        yiq = torch.tensor(_RGB_TO_YIQ)
        self.register_buffer("rgb_to_yiq", yiq, persistent=False)
        self.register_buffer("yiq_to_rgb", torch.linalg.inv(yiq), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    def crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        n, device = x.shape[0], x.device
        area = _uniform(n, self.min_scale, 1.0, device)
        ratio = torch.exp(_uniform(n, *self.log_ratio, device))
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the image side
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(n, device=device) * (1 - w) + w / 2) * 2 - 1  # crop centre in [-1, 1]
        cy = (torch.rand(n, device=device) * (1 - h) + h / 2) * 2 - 1
        flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _grey(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.luma).sum(dim=1, keepdim=True)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        n, device = x.shape[0], x.device
        view = (n, 1, 1, 1)
        b = _uniform(n, 1 - self.brightness, 1 + self.brightness, device).view(view)
        c = _uniform(n, 1 - self.contrast, 1 + self.contrast, device).view(view)
        s = _uniform(n, 1 - self.saturation, 1 + self.saturation, device).view(view)
        out = (x * b).clamp(0, 1)
        mean = self._grey(out).mean(dim=(2, 3), keepdim=True)
        out = ((out - mean) * c + mean).clamp(0, 1)
        grey = self._grey(out)
        out = ((out - grey) * s + grey).clamp(0, 1)
        angle = _uniform(n, -self.hue, self.hue, device) * 2 * math.pi
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.zeros(n, 3, 3, device=device)
        rotation[:, 0, 0] = 1
        rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
        rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
        transform = self.yiq_to_rgb @ rotation @ self.rgb_to_yiq  # [n, 3, 3]
        out = torch.einsum("nij,njhw->nihw", transform, out).clamp(0, 1)
        apply = (torch.rand(n, device=device) < self.jitter_p).view(view)
        return torch.where(apply, out, x)

    def grayscale(self, x: torch.Tensor) -> torch.Tensor:
        apply = (torch.rand(x.shape[0], device=x.device) < self.grayscale_p).view(-1, 1, 1, 1)
        return torch.where(apply, self._grey(x).expand_as(x), x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, 3, H, W] in [0, 1] -> an augmented view [N, 3, size, size]."""
        return self.grayscale(self.jitter(self.crop_and_flip(x.float())))


def _scan_ops() -> list[tuple[str, float, float]]:
    """SCAN's official strong-augmentation list (14 ops, each with its magnitude range; wvangansbeke/
    Unsupervised-Classification, data/augment.py): a magnitude is drawn uniformly in the range each time."""
    return [
        ("identity", 0, 1),
        ("autocontrast", 0, 1),
        ("equalize", 0, 1),
        ("rotate", -30, 30),
        ("solarize", 0, 256),
        ("color", 0.05, 0.95),
        ("contrast", 0.05, 0.95),
        ("brightness", 0.05, 0.95),
        ("sharpness", 0.05, 0.95),
        ("shear_x", -0.1, 0.1),
        ("translate_x", -0.1, 0.1),
        ("translate_y", -0.1, 0.1),
        ("posterize", 4, 8),
        ("shear_y", -0.1, 0.1),
    ]


def _apply_op(image: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """One op on a uint8 [3, H, W] image, with PIL's semantics (enhance factors, shear as an affine coefficient,
    translation as a fraction of the side, black fill)."""
    from torchvision.transforms.v2 import functional as TF

    side_h, side_w = image.shape[-2:]
    if name == "identity":
        return image
    if name == "autocontrast":
        return TF.autocontrast(image)
    if name == "equalize":
        return TF.equalize(image)
    if name == "rotate":
        return TF.rotate(image, value)
    if name == "solarize":
        return TF.solarize(image, min(value, 255.0))
    if name == "color":
        return TF.adjust_saturation(image, value)
    if name == "contrast":
        return TF.adjust_contrast(image, value)
    if name == "brightness":
        return TF.adjust_brightness(image, value)
    if name == "sharpness":
        return TF.adjust_sharpness(image, value)
    if name == "posterize":
        return TF.posterize(image, int(value))
    if name in ("shear_x", "shear_y"):
        angle = math.degrees(math.atan(value))
        shear = [angle, 0.0] if name == "shear_x" else [0.0, angle]
        return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear)
    if name in ("translate_x", "translate_y"):
        shift = [round(value * side_w), 0] if name == "translate_x" else [0, round(value * side_h)]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
    raise ValueError(f"unknown op {name!r}")


class StrongAugment(nn.Module):
    """SCAN's strong view on a batch (see `training.data.views.Strong`), as the official code: horizontal flip,
    `num_ops` ops drawn with replacement from `_scan_ops` each at a uniformly drawn magnitude (per image, on uint8 at
    the input resolution), Cutout of one square whose side is drawn in [1, cutout_fraction x side] (official: 1..16 px
    at 32 px) with its centre anywhere, then a bicubic resize to `size`.

    Cutout fills with 0.5 (mid-grey): the official code zeroes *normalised* pixels, i.e. fills with the mean colour;
    mid-grey is the normalisation mean of the EfficientNet-Lite backbones.
    """

    def __init__(self, size: int, cutout_fraction: float = 0.5, num_ops: int = 4) -> None:
        super().__init__()
        self.size = size
        self.cutout_fraction = cutout_fraction
        self.num_ops = num_ops
        self.ops = _scan_ops()

    def augment_one(self, image: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) < 0.5:
            image = image.flip(-1)
        for choice in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            name, low, high = self.ops[choice]
            image = _apply_op(image, name, low + float(torch.rand(())) * (high - low))
        return image

    def cutout(self, x: torch.Tensor) -> torch.Tensor:
        """One filled square per image, side uniform in [1, cutout_fraction x side], centre anywhere (clipped)."""
        n, _, h, w = x.shape
        longest = int(round(min(h, w) * self.cutout_fraction))
        if longest < 1:
            return x
        side = torch.randint(1, longest + 1, (n, 1, 1), device=x.device)
        cy = torch.randint(0, h, (n, 1, 1), device=x.device)
        cx = torch.randint(0, w, (n, 1, 1), device=x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        half = side // 2
        hole = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
        return x.masked_fill(hole.unsqueeze(1), 0.5)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, 3, H, W] in [0, 1] -> strong view [N, 3, size, size] in [0, 1]."""
        as_uint8 = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        out = torch.stack([self.augment_one(image) for image in as_uint8.cpu()]).to(x.device).float() / 255.0
        out = self.cutout(out)
        if out.shape[-1] != self.size or out.shape[-2] != self.size:
            out = F.interpolate(out, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        return out
