"""Fashion-MNIST from its standard IDX files (train-images-idx3-ubyte.gz etc.).

Default folder: the Debian/Ubuntu package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist). Fashion-MNIST: MIT licence, Copyright (c) 2017 Zalando SE.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from lgd.data.base import TensorImageDataset
from lgd.data.classes import FASHION_MNIST_CLASSES
from lgd.errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
_PREFIX = {"train": "train", "test": "t10k"}

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed when the name ends in .gz) into an array.

    Header: two zero bytes, a type byte, the number of dimensions, then each dimension as a
    big-endian uint32; the data must fill exactly the product of the dimensions.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"IDX file {path} is not a readable gzip file: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"IDX file {path} has a bad magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"IDX file {path}: shape {shape} needs {expected} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found; install the Debian package "
        f"dataset-fashion-mnist or pass the folder that holds the IDX files"
    )


def read_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of split 'train' or 'test'."""
    if split not in _PREFIX:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else DEFAULT_ROOT
    prefix = _PREFIX[split]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"Fashion-MNIST {split} images must be uint8 [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but labels of shape {labels.shape}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"Fashion-MNIST {split} labels must lie in 0..9, found {labels.max()}")
    return images, labels


def to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorImageDataset:
    """Wrap grey [N, 28, 28] uint8 arrays as a one-channel TensorImageDataset."""
    return TensorImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
    )


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> TensorImageDataset:
    return to_dataset(*read_fashion_mnist(split, root))
