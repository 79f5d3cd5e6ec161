"""Which images a run trains on and which it is evaluated on.

`data.evaluate_on: test` (the default) trains on the dataset's training split and evaluates on
its test split. `validation` holds out `data.validation_per_class` random training images of
every class (a fixed draw: the same images on every machine and in every run), trains on the
remaining ones and evaluates on the held-out ones. Settings are chosen that way, and the test
split is only used to report the chosen settings.
"""
from __future__ import annotations

import torch

from lgd.data.base import per_class_subset
from lgd.errors import DataError

VALIDATION_SEED = 20260  # fixed: the validation images must not change between tuning runs


def split_validation(train, per_class: int):
    """(fit, validation): the training set without and with only `per_class` held-out images
    of every class, both in the original order."""
    counts = train.labels.bincount(minlength=train.num_classes)
    if per_class >= counts.min():
        c = int(counts.argmin())
        raise DataError(f"data.validation_per_class={per_class} leaves no training images: class {c} "
                        f"({train.classes[c]}) has {int(counts[c])} images, fewer than {per_class + 1}")
    held = torch.zeros(len(train), dtype=torch.bool)
    held[per_class_subset(train, per_class, torch.Generator().manual_seed(VALIDATION_SEED))] = True
    return train.subset(torch.nonzero(~held).flatten()), train.subset(torch.nonzero(held).flatten())


def load_split(data, role: str, image_size: int | None = None):
    """The images a run with data section `data` uses for `role`: 'train' (what the reference
    model, the stage models and the Random baseline see) or 'test' (what the evaluation scores
    on). `image_size` as for load_dataset (None: data.image_size)."""
    from lgd.data import load_dataset

    size = image_size if image_size is not None else data.image_size
    if data.evaluate_on == "test":
        return load_dataset(data.name, role, data.root, size)
    fit, validation = split_validation(load_dataset(data.name, "train", data.root, size), data.validation_per_class)
    return fit if role == "train" else validation
