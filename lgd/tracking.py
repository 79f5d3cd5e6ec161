"""Optional experiment tracking through Accelerate's tracker API (config field `tracker`).

Off by default. `tensorboard` writes RUN/tracking/ (needs the tensorboard package), `wandb` a
Weights & Biases run (needs wandb and its login). The run logs what its log file says in
numbers: each stage's images/s and each cached classifier's loss per epoch.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lgd.errors import ConfigError

TRACKERS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_tracker(kind: str) -> None:
    """Refuse an unknown tracker, or one whose package is not installed."""
    if kind not in TRACKERS:
        raise ConfigError(f"tracker must be one of {', '.join(TRACKERS)}, got {kind!r}")
    if kind != "none" and not any(importlib.util.find_spec(p) for p in PACKAGES[kind]):
        raise ConfigError(f"tracker={kind} needs the {PACKAGES[kind][0]} package (pip install {PACKAGES[kind][0]}); "
                          "or tracker=none")


def open_tracker(kind: str, run: Path, config: dict):
    """An Accelerate tracker for the run, started, with the config stored; None for "none"."""
    check_tracker(kind)
    if kind == "none":
        return None
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    tracker = TensorBoardTracker(run.name, run / "tracking") if kind == "tensorboard" else \
        WandBTracker(run.name, dir=str(run))
    tracker.start()
    tracker.store_init_configuration(_flat(config))
    return tracker


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": scalar} (trackers take flat hyperparameters)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
