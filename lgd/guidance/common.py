"""Pieces shared by the guidance kinds."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def to_classifier_input(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Decoded [0, 1] images resized (differentiably) to the classifiers' input size."""
    if size is None or images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def drop_nonfinite(grad: torch.Tensor, failed: set[int], what: str) -> torch.Tensor:
    """Zero the rows of a per-sample gradient that hold NaN/inf and record them in `failed`,
    so the caller drops and redraws those candidates."""
    finite = torch.isfinite(grad.flatten(1)).all(dim=1)
    if finite.all():
        return grad
    bad = (~finite).nonzero().squeeze(1).tolist()
    log.warning("non-finite %s for batch rows %s: those candidates will be redrawn", what, bad)
    failed.update(bad)
    return torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad, torch.zeros_like(grad))
