"""Classifier training: the recipes of method.md §7, their augmentations, and accuracy."""
from lgd.training.augment import (
    DSAParams,
    color_jitter,
    cutmix,
    dsa_augment,
    hard_label_augment,
    mixed_cross_entropy,
    pca_lighting,
    random_resized_crop,
)
from lgd.training.trainer import (
    RECIPES,
    TrainHistory,
    accuracy,
    default_epochs,
    fit_size,
    lr_milestones,
    train_classifier,
    true_class_probability,
)

__all__ = [
    "DSAParams",
    "RECIPES",
    "TrainHistory",
    "accuracy",
    "color_jitter",
    "cutmix",
    "default_epochs",
    "dsa_augment",
    "fit_size",
    "hard_label_augment",
    "lr_milestones",
    "mixed_cross_entropy",
    "pca_lighting",
    "random_resized_crop",
    "train_classifier",
    "true_class_probability",
]
