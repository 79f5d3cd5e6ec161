"""Batched, seeded image augmentations for classifier training (docs/method.md §7).

Everything works on a whole batch [B, C, H, W] on the training device: random parameters are
drawn as small tensors from an explicit torch.Generator (on the generator's device, then
moved to the batch's device), so a run is reproducible and no per-image Python loop runs.

Three recipes:
- hard-label (IDC / Minimax lineage): RandomResizedCrop(scale 0.5-1) + horizontal flip,
  ColorJitter(0.4, 0.4, 0.4), PCA lighting (0.1, ImageNet eigen-basis), then CutMix
  (Beta(1, 1), p = 1) whose loss mixes the two labels by area. Images stay in [0, 1].
- soft-label (RDED / SRe2L evaluation): RandomResizedCrop(scale 0.5-1) + horizontal flip,
  then the same CutMix; the teacher labels the mixed images, so no label mixing is kept.
- DSA (Zhao & Bilen 2021) for the DC/DSA ConvNet protocol: strategy
  color_crop_cutout_flip_scale_rotate in DSA's single mode -- one transformation family is
  drawn per batch (the whole batch gets the same kind of transformation), each image gets
  its own parameters within it. DSA's magnitudes are defined on mean/std-normalised images,
  so the batch is normalised, augmented and mapped back. Differentiable w.r.t. the input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# PCA of ImageNet RGB pixels (eigen-values and column eigen-vectors), the AlexNet lighting noise.
IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = torch.tensor([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
])
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


def _uniform(n: int, low: float, high: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=generator.device)
    return (low + (high - low) * u).to(device=like.device, dtype=like.dtype)


def _randint(n: int, low: int, high: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """n integers in [low, high) on the batch's device."""
    return torch.randint(low, high, (n,), generator=generator, device=generator.device).to(like.device)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


# ---------------------------------------------------------------- hard-label recipe


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> torch.Tensor:
    """Per-image random crop (area fraction in `scale`, aspect ratio in `ratio`) resized to
    size x size, with a horizontal flip of probability flip_p folded into the same bilinear
    resampling. Like torchvision, 10 draws per image; an image with no valid draw keeps the
    whole frame."""
    b = x.shape[0]
    area = _uniform(b * 10, *scale, generator, x).view(b, 10)
    log_r = _uniform(b * 10, math.log(ratio[0]), math.log(ratio[1]), generator, x).view(b, 10)
    w = torch.sqrt(area * log_r.exp())  # fractions of the width / height
    h = torch.sqrt(area / log_r.exp())
    valid = (w <= 1) & (h <= 1)
    first = valid.float().argmax(1, keepdim=True)  # index of the first valid draw
    found = valid.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), 1.0)
    h = torch.where(found, h.gather(1, first).squeeze(1), 1.0)
    cx = w / 2 + (1 - w) * _uniform(b, 0, 1, generator, x)
    cy = h / 2 + (1 - h) * _uniform(b, 0, 1, generator, x)
    flip = _uniform(b, 0, 1, generator, x) < flip_p
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> torch.Tensor:
    """torchvision ColorJitter semantics with per-image factors in [1 - s, 1 + s]; the order
    of the three adjustments is drawn once per batch. Saturation needs colour: skipped
    unless the images have 3 channels."""
    b = x.shape[0]
    ops = ["brightness", "contrast"] + (["saturation"] if x.shape[1] == 3 else [])
    strength = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
    for i in torch.randperm(len(ops), generator=generator, device=generator.device).tolist():
        op = ops[i]
        f = _uniform(b, 1 - strength[op], 1 + strength[op], generator, x).view(b, 1, 1, 1)
        if op == "brightness":
            x = x * f
        elif op == "contrast":
            x = f * x + (1 - f) * _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        else:
            x = f * x + (1 - f) * _grey(x)
        x = x.clamp(0, 1)
    return x


def pca_lighting(x: torch.Tensor, generator: torch.Generator, alphastd: float = 0.1) -> torch.Tensor:
    """AlexNet-style lighting noise along ImageNet's RGB principal components; identity
    for non-RGB images. Clamped so classifiers still see [0, 1] inputs."""
    if x.shape[1] != 3 or alphastd == 0:
        return x
    alpha = alphastd * torch.randn(x.shape[0], 3, generator=generator, device=generator.device)
    alpha = alpha.to(device=x.device, dtype=x.dtype)
    eigvec = IMAGENET_EIGVEC.to(device=x.device, dtype=x.dtype)
    eigval = IMAGENET_EIGVAL.to(device=x.device, dtype=x.dtype)
    shift = (alpha * eigval) @ eigvec.T  # [B, 3]: sum_j eigvec[:, j] * alpha_j * eigval_j
    return (x + shift[:, :, None, None]).clamp(0, 1)


def hard_label_augment(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The hard-label recipe before CutMix: crop+flip to `size`, colour jitter, lighting."""
    x = random_resized_crop(x, size, generator)
    x = color_jitter(x, generator)
    return pca_lighting(x, generator)


def soft_label_augment(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The soft-label recipe's images: crop (scale 0.5-1) + flip to `size`, then CutMix
    (every batch, Beta(1, 1)); the partner labels and lam are not needed (the teacher scores
    the mixed images), but CutMix makes its usual draws."""
    x = random_resized_crop(x, size, generator)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return cutmix(x, labels, generator)[0]


def cutmix(
    x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix with Beta(1, 1) (uniform) mixing, applied to every batch (p = 1).

    One box for the whole batch (as in the reference CutMix): a box with area fraction
    1 - lam at a uniform centre (clipped at the border) is pasted from a shuffled copy of
    the batch. Returns (mixed images, partner labels, lam) where lam is the *actual*
    fraction of each image left untouched after clipping; the loss is
    lam * CE(labels) + (1 - lam) * CE(partner labels).
    """
    b, _, h, w = x.shape
    lam = float(torch.rand((), generator=generator, device=generator.device))
    perm = torch.randperm(b, generator=generator, device=generator.device).to(x.device)
    cut = math.sqrt(1 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (), generator=generator, device=generator.device))
    cx = int(torch.randint(w, (), generator=generator, device=generator.device))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, labels[perm], torch.tensor(kept, device=x.device, dtype=x.dtype)


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Mean (or sum) over the batch of lam * CE(labels) + (1 - lam) * CE(partner)."""
    return (lam * F.cross_entropy(logits, labels, reduction=reduction)
            + (1 - lam) * F.cross_entropy(logits, partner, reduction=reduction))


# ---------------------------------------------------------------- DSA


@dataclass(frozen=True)
class DSAParams:
    """DSA's default magnitudes (on normalised images)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)  # zeros outside: the mean colour once normalised


def _dsa_color(x: torch.Tensor, g: torch.Generator, p: DSAParams) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_uniform(b, 0, 1, g, x) - 0.5).view(b, 1, 1, 1) * p.brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(b, 0, 1, g, x) * p.saturation).view(b, 1, 1, 1) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(b, 0, 1, g, x) + p.contrast).view(b, 1, 1, 1) + mean


def _dsa_crop(x: torch.Tensor, g: torch.Generator, p: DSAParams) -> torch.Tensor:
    """Shift each image by an integer offset within +-ratio_crop_pad of its size (zero fill)."""
    b, _, h, w = x.shape
    sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    ty, tx = _randint(b, -sh, sh + 1, g, x), _randint(b, -sw, sw + 1, g, x)
    padded = F.pad(x, (sw, sw, sh, sh))
    rows = torch.arange(h, device=x.device)[None] + sh + ty[:, None]  # [B, H]
    cols = torch.arange(w, device=x.device)[None] + sw + tx[:, None]  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # indexing puts C last


def _dsa_cutout(x: torch.Tensor, g: torch.Generator, p: DSAParams) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    cy, cx = _randint(b, 0, h + (1 - ch % 2), g, x), _randint(b, 0, w + (1 - cw % 2), g, x)
    rows = torch.arange(h, device=x.device)[None] - (cy - ch // 2)[:, None]  # [B, H], inside: 0 <= r < ch
    cols = torch.arange(w, device=x.device)[None] - (cx - cw // 2)[:, None]
    inside = ((rows >= 0) & (rows < ch))[:, :, None] & ((cols >= 0) & (cols < cw))[:, None, :]
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _dsa_flip(x: torch.Tensor, g: torch.Generator, p: DSAParams) -> torch.Tensor:
    flip = _uniform(x.shape[0], 0, 1, g, x) < p.prob_flip
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _dsa_scale(x: torch.Tensor, g: torch.Generator, p: DSAParams) -> torch.Tensor:
    b = x.shape[0]
    lo, hi = 1 / p.ratio_scale, p.ratio_scale
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = _uniform(b, lo, hi, g, x)
    theta[:, 1, 1] = _uniform(b, lo, hi, g, x)
    return _affine(x, theta)


def _dsa_rotate(x: torch.Tensor, g: torch.Generator, p: DSAParams) -> torch.Tensor:
    b = x.shape[0]
    angle = (_uniform(b, 0, 1, g, x) - 0.5) * 2 * math.radians(p.ratio_rotate)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, sin, torch.zeros_like(cos)], 1),
                         torch.stack([-sin, cos, torch.zeros_like(cos)], 1)], 1)
    return _affine(x, theta)


_DSA_FAMILIES = {
    "color": _dsa_color,
    "crop": _dsa_crop,
    "cutout": _dsa_cutout,
    "flip": _dsa_flip,
    "scale": _dsa_scale,
    "rotate": _dsa_rotate,
}


def dsa_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    strategy: str = DSA_STRATEGY,
    params: DSAParams = DSAParams(),
    mean: torch.Tensor | float = 0.5,
    std: torch.Tensor | float = 0.5,
) -> torch.Tensor:
    """DSA in single mode: one family of `strategy` (underscore-separated) for the batch.

    x is in [0, 1]; mean/std (scalars or [1, C, 1, 1]) are the classifier's normalisation,
    so DSA acts on the images the network actually sees. The result is not clamped (DSA
    does not clamp), and gradients flow to x.
    """
    families = strategy.split("_")
    unknown = [f for f in families if f not in _DSA_FAMILIES]
    if unknown:
        raise ValueError(f"unknown DSA transformation(s) {unknown}; known: {', '.join(_DSA_FAMILIES)}")
    family = families[int(torch.randint(len(families), (), generator=generator, device=generator.device))]
    z = (x - mean) / std
    return _DSA_FAMILIES[family](z, generator, params) * std + mean
