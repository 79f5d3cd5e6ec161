"""The run directory: what a distillation run writes and how later commands read it.

    RUN/
      config.yaml                      the resolved config (written before any work)
      images/<class>/<stage>-<slot>.png  the distilled set, ImageFolder layout
      records/<stage>/<class>-<slot>.json  per-image metadata (stage, class, seed, S, losses)
      latents/<stage>/<class>-<slot>.safetensors  the image's final latent
      models/*.safetensors             reference, stage and surrogate classifiers
      baselines/<name>/...             baseline sets for evaluation (random real, plain DiT)
      eval/                            evaluation results, analyses, report.md

A record is written last, after its PNG and latent: an image counts as finished exactly
when its record exists, which is what resuming relies on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lgd.errors import DataError
from lgd.files import read_json


def image_name(stage: int, cls: int, slot: int) -> str:
    return f"images/{cls:04d}/{stage:02d}-{slot:05d}.png"


def record_name(stage: int, cls: int, slot: int) -> str:
    return f"records/{stage:02d}/{cls:04d}-{slot:05d}.json"


def latent_name(stage: int, cls: int, slot: int) -> str:
    return f"latents/{stage:02d}/{cls:04d}-{slot:05d}.safetensors"


@dataclass
class SyntheticSet:
    """A distilled image set in memory: images in [0, 1], labels and the increment of each image."""

    images: torch.Tensor  # float32 [N, C, H, W]
    labels: torch.Tensor  # long [N]
    increments: torch.Tensor  # long [N], stage index (1 = seed increment)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, mask: torch.Tensor) -> "SyntheticSet":
        return SyntheticSet(self.images[mask], self.labels[mask], self.increments[mask])


def read_png(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path))
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()).float() / 255


def finished_records(run: str | Path) -> list[dict]:
    """Metadata of every finished image, in (stage, class, slot) order."""
    run = Path(run)
    return [read_json(p) for p in sorted((run / "records").glob("*/*.json"))]


def load_synthetic(run: str | Path, stages: list[int] | None = None) -> SyntheticSet:
    """The distilled set of a run directory (optionally only some increments)."""
    run = Path(run)
    records = [r for r in finished_records(run) if stages is None or r["stage"] in stages]
    if not records:
        raise DataError(f"{run} holds no finished images" + (f" for stages {stages}" if stages else ""))
    images = torch.stack([read_png(run / r["file"]) for r in records])
    labels = torch.tensor([r["class"] for r in records])
    increments = torch.tensor([r["stage"] for r in records])
    return SyntheticSet(images, labels, increments)
