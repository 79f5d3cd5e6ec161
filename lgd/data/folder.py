"""ImageNet-layout folders: root/{train,val}/<wnid>/*.(JPEG|jpg|png).

Images are read lazily with PIL, converted to RGB, the shorter side resized to image_size
and centre-cropped to image_size x image_size (the usual evaluation transform).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lgd.data.classes import WNID_NAMES
from lgd.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})  # compared lower-case: covers .JPEG


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _split_dir(root: str | Path, split: str) -> Path:
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"split folder {split_dir} does not exist (expected {Path(root)}/{split}/<class id>/*.JPEG)")
    return split_dir


def list_class_ids(root: str | Path, split: str = "train") -> list[str]:
    """Class folder names under root/split, sorted (the label order of a generic folder)."""
    ids = sorted(p.name for p in _split_dir(root, split).iterdir() if p.is_dir())
    if not ids:
        raise DataError(f"split folder {Path(root) / split} has no class folders")
    return ids


def check_layout(root: str | Path, split: str, class_ids: Sequence[str]) -> list[list[Path]]:
    """Check that every class folder exists and holds images; return each class's image
    files (sorted) in class order. The error names every missing and every empty class."""
    split_dir = _split_dir(root, split)
    missing, empty, files = [], [], []
    for wnid in class_ids:
        folder = split_dir / wnid
        if not folder.is_dir():
            missing.append(wnid)
            continue
        images = _images_in(folder)
        if not images:
            empty.append(wnid)
        files.append(images)
    problems = []
    if missing:
        problems.append(f"missing class folder(s): {', '.join(missing)}")
    if empty:
        problems.append(f"class folder(s) with no .JPEG/.jpg/.png images: {', '.join(empty)}")
    if problems:
        raise DataError(f"{split_dir}: " + "; ".join(problems))
    return files


def load_rgb(path: Path, image_size: int) -> torch.Tensor:
    """One image as float32 [3, S, S] in [0, 1]: shorter side -> S, centre crop."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    w, h = img.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


class ImageFolderDataset(Dataset):
    """Lazily loaded ImageNet-layout split. `class_ids` are the folder names in label order;
    `classes` their readable names where known (else the id itself)."""

    channels = 3

    def __init__(self, root: str | Path, split: str, class_ids: Sequence[str], image_size: int):
        files = check_layout(root, split, class_ids)
        self.root = Path(root)
        self.split = split
        self.class_ids = list(class_ids)
        self.classes = [WNID_NAMES.get(wnid, wnid) for wnid in self.class_ids]
        self.image_size = image_size
        self.samples = [(path, label) for label, paths in enumerate(files) for path in paths]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: torch.Tensor) -> ImageFolderDataset:
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices.tolist()]
        part.labels = self.labels[indices]
        return part

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_rgb(path, self.image_size), label
