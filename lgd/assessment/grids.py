"""Sample grids for the report: a few images per class of every evaluated set, and real images
of the same classes, one row per class, written as RUN/eval/samples_<set>.png."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lgd.files import write_png

PER_CLASS = 6  # columns
MAX_CLASSES = 10  # rows: the first classes of a 100- or 1000-class set
MIN_TILE = 64  # px: smaller images are enlarged by a whole factor (nearest), so pixels stay pixels
MAX_TILE = 96  # px: larger images are shrunk (antialiased), so a grid stays a few hundred kB


def tile_size(size: int) -> int:
    """The side of a grid tile for images of `size` px."""
    return size * max(1, MIN_TILE // size) if size < MIN_TILE else min(size, MAX_TILE)


def class_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int = PER_CLASS,
               max_classes: int = MAX_CLASSES) -> torch.Tensor:
    """[C, rows * S, per_class * S] float in [0, 1]: row c holds the first `per_class` images of
    class c (first `max_classes` classes present); short rows are padded with white."""
    tiles = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    size = tile_size(tiles.shape[-1])
    if size < tiles.shape[-1]:
        tiles = F.interpolate(tiles, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    elif size > tiles.shape[-1]:
        tiles = F.interpolate(tiles, size=(size, size), mode="nearest")
    blank = torch.ones_like(tiles[0])
    rows = []
    for c in labels.unique().tolist()[:max_classes]:
        chosen = list(tiles[labels == c][:per_class])
        rows.append(torch.cat(chosen + [blank] * (per_class - len(chosen)), dim=-1))
    return torch.cat(rows, dim=-2)


def write_grids(eval_dir: Path, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, str]:
    """Write one grid per set ({name: (images, labels)}); returns {name: file name}."""
    names = {}
    for name, (images, labels) in sets.items():
        names[name] = f"samples_{name}.png"
        write_png(eval_dir / names[name], class_grid(images, labels))
    return names
