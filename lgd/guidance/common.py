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


class NonFinite:
    """Zeroes the rows of per-sample gradients that hold NaN/inf and remembers them, without a
    host sync per step; `failed` (one sync) lists them so the caller drops and redraws them."""

    def __init__(self, what: str):
        self.what = what
        self.mask: torch.Tensor | None = None

    def clean(self, grad: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(grad.flatten(1)).all(dim=1)
        self.mask = ~finite if self.mask is None else self.mask | ~finite
        return torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad, torch.zeros_like(grad))

    def pop_failed(self) -> set[int]:
        """The rows that failed since the last call, then reset."""
        rows = set() if self.mask is None else set(self.mask.nonzero().squeeze(1).tolist())
        self.mask = None
        if rows:
            log.warning("non-finite %s for batch rows %s: those candidates will be redrawn", self.what, sorted(rows))
        return rows
