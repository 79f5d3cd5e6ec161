"""Classifier training: the recipes of docs/method.md §7, their augmentations, two engines, and accuracy."""
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
from lgd.training.recipes import RECIPES, TrainHistory, default_epochs, lr_milestones
from lgd.training.trainer import (
    Member,
    accuracies,
    accuracy,
    train_classifier,
    train_classifiers,
    true_class_probability,
)

__all__ = [
    "DSAParams",
    "Member",
    "RECIPES",
    "TrainHistory",
    "accuracies",
    "accuracy",
    "color_jitter",
    "cutmix",
    "default_epochs",
    "dsa_augment",
    "hard_label_augment",
    "lr_milestones",
    "mixed_cross_entropy",
    "pca_lighting",
    "random_resized_crop",
    "train_classifier",
    "train_classifiers",
    "true_class_probability",
]
