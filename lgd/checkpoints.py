"""Classifier checkpoints: safetensors weights + the architecture needed to rebuild them."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lgd.classifiers import build_classifier
from lgd.errors import CheckpointError
from lgd.files import write_tensors


def save_classifier(model: torch.nn.Module, path: str | Path, spec: dict, extra: dict | None = None) -> None:
    """`spec` holds build_classifier's arguments (name, in_channels, num_classes, image_size, mean, std)."""
    write_tensors(path, model.state_dict(), {"spec": spec, **(extra or {})})


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}


def load_classifier(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a saved classifier in eval mode; returns (model, metadata)."""
    path = Path(path)
    try:
        meta = read_metadata(path)
        state = load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises several unrelated types for a bad file
        raise CheckpointError(f"unreadable classifier checkpoint {path}: {exc}") from None
    if "spec" not in meta:
        raise CheckpointError(f"{path} has no classifier spec in its metadata")
    model = build_classifier(**meta["spec"])
    model.load_state_dict(state)
    return model.to(device).eval(), meta
