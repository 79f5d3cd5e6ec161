"""Datasets: one loader by name, the shared dataset contract and subset helpers.

Every dataset yields (float32 [C, H, W] in [0, 1], int label) and exposes `labels`,
`classes`, `num_classes`, `channels`, `image_size` (see lgd.data.base).
"""
from __future__ import annotations

from pathlib import Path

from lgd.data.base import LabelledImages, TensorImageDataset, class_indices, per_class_subset
from lgd.data.classes import FASHION_MNIST_CLASSES, IMAGENET_INDEX, IMAGENETTE, IMAGEWOOF, WNID_NAMES
from lgd.data.embedded import load_embedded
from lgd.data.fashion_mnist import load_fashion_mnist, read_idx
from lgd.data.folder import ImageFolderDataset, check_layout, list_class_ids
from lgd.errors import ConfigError

DATASETS = ("fashion_mnist_embedded", "fashion_mnist", "imagenette", "imagewoof", "imagefolder")
_ALIASES = {"demo": "fashion_mnist_embedded"}
DEFAULT_FOLDER_IMAGE_SIZE = 224  # the IDC/Minimax evaluation resolution
_FOLDER_CLASSES = {"imagenette": IMAGENETTE, "imagewoof": IMAGEWOOF}


def _split(split: str, names: tuple[str, str]) -> str:
    """Map 'train' / 'val' / 'test' onto the dataset's own two split names (val == test)."""
    if split == "train":
        return "train"
    if split in ("val", "test"):
        return names[1]
    raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")


def load_dataset(
    name: str, split: str = "train", root: str | Path | None = None, image_size: int | None = None
) -> LabelledImages:
    """Load a dataset by name.

    - fashion_mnist_embedded (alias demo): the subset shipped with the package (28 px grey).
    - fashion_mnist: full Fashion-MNIST from IDX files in `root` (default: Debian package).
    - imagenette, imagewoof: ImageNet-layout folder `root` with train/ and val/, canonical
      class order; imagefolder: same layout, classes = sorted folders of root/train.
    'val' and 'test' name the same held-out split. image_size resizes in-memory sets
    (bilinear, antialiased; None keeps 28 px) and sets the resize + centre crop of folders
    (None = 224).
    """
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key == "fashion_mnist_embedded":
        data = load_embedded(_split(split, ("train", "test")))
    elif key == "fashion_mnist":
        data = load_fashion_mnist(_split(split, ("train", "test")), root)
    elif key in ("imagenette", "imagewoof", "imagefolder"):
        if root is None:
            raise ConfigError(f"dataset {name!r} needs root: a folder with train/<class id>/ and val/<class id>/")
        class_ids = _FOLDER_CLASSES.get(key) or list_class_ids(root, "train")
        size = image_size or DEFAULT_FOLDER_IMAGE_SIZE
        return ImageFolderDataset(root, _split(split, ("train", "val")), class_ids, size)
    else:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} (alias: demo)")
    return data.resized(image_size) if image_size else data


def model_class_map(dataset, model_classes: int, model: str = "the model") -> list[int]:
    """The label a model of `model_classes` outputs uses for each dataset class: the ImageNet-1K
    index of its WordNet id for a 1000-class model (a DiT, a torchvision teacher) on ImageNet or
    any subset of it (ImageNette, ImageWoof), else the same index."""
    wnids = getattr(dataset, "class_ids", None)
    if model_classes == 1000 and wnids and all(w in IMAGENET_INDEX for w in wnids):
        return [IMAGENET_INDEX[w] for w in wnids]
    if model_classes == dataset.num_classes:
        return list(range(model_classes))
    raise ConfigError(f"{model} has {model_classes} classes and the dataset {dataset.num_classes}, and its "
                      "classes are not ImageNet WordNet ids that a 1000-class model could label")


__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGENETTE",
    "IMAGENET_INDEX",
    "model_class_map",
    "IMAGEWOOF",
    "ImageFolderDataset",
    "LabelledImages",
    "TensorImageDataset",
    "WNID_NAMES",
    "check_layout",
    "class_indices",
    "list_class_ids",
    "load_dataset",
    "load_embedded",
    "load_fashion_mnist",
    "per_class_subset",
    "read_idx",
]
