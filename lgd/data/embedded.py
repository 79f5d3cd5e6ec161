"""The Fashion-MNIST subset shipped inside the package, so the demo runs with no download.

assets/fashion_mnist_subset.npz holds train_images/test_images (uint8 [N, 28, 28]) and
train_labels/test_labels (uint8 [N]), class-balanced; see make_embedded.py for how it is
made and assets/FASHION_MNIST_LICENSE.txt for its licence (MIT, Zalando SE).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lgd.data.base import TensorImageDataset
from lgd.data.fashion_mnist import to_dataset
from lgd.errors import DataError

ASSET = Path(__file__).parent / "assets" / "fashion_mnist_subset.npz"


def load_embedded(split: str = "train") -> TensorImageDataset:
    """The embedded subset's 'train' or 'test' split as a one-channel 28 px dataset."""
    if split not in ("train", "test"):
        raise DataError(f"the embedded Fashion-MNIST subset has splits 'train' and 'test', not {split!r}")
    if not ASSET.is_file():
        raise DataError(f"embedded dataset {ASSET} is missing; regenerate it with `python -m lgd.data.make_embedded`")
    with np.load(ASSET) as data:
        return to_dataset(data[f"{split}_images"], data[f"{split}_labels"])
