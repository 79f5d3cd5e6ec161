"""Regenerate the embedded Fashion-MNIST subset (lgd/data/assets/fashion_mnist_subset.npz).

    python -m lgd.data.make_embedded [--root /usr/share/datasets/fashion-mnist]
        [--train-per-class 500] [--test-per-class 100] [--seed 0] [--out PATH]

Reads the standard IDX files (default: the Debian package dataset-fashion-mnist), draws a
class-balanced random subset of each split with a fixed seed (indices kept in their
original order) and writes it with np.savez_compressed as uint8. Same inputs and seed give
the same file contents.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lgd.data.embedded import ASSET
from lgd.data.fashion_mnist import DEFAULT_ROOT, read_fashion_mnist
from lgd.errors import DataError


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """per_class random indices of every label value, sorted ascending."""
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise DataError(f"class {c} has {len(idx)} images, fewer than {per_class}")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def make_embedded(
    root: Path = DEFAULT_ROOT, out: Path = ASSET, train_per_class: int = 500, test_per_class: int = 100, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = read_fashion_mnist(split, root)
        idx = balanced_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_embedded(args.root, args.out, args.train_per_class, args.test_per_class, args.seed)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
