"""The demo models shipped inside the package (lgd/assets/demo): where they are and how to load them.

A small AutoencoderKL (32x32 grey images <-> 8x8x4 latents) and a small class-conditional DiT
(10 Fashion-MNIST classes), both trained by `python -m lgd.demo.train`; see
lgd/assets/demo/README.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lgd.errors import CheckpointError
from lgd.models import DiT, load_dit

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
IMAGE_SIZE = 32  # Fashion-MNIST's 28 px resized (bilinear, antialiased)
NUM_CLASSES = 10


def demo_paths(root: str | Path = ASSETS) -> dict[str, Path]:
    """{"dit": the DiT safetensors file, "vae": the AutoencoderKL folder}; both must exist."""
    root = Path(root)
    paths = {"dit": root / "dit.safetensors", "vae": root / "vae"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise CheckpointError(
            f"demo model file(s) missing: {', '.join(missing)}; reinstall lgd or retrain them with "
            "`python -m lgd.demo.train vae` and `python -m lgd.demo.train dit`"
        )
    return paths


def load_demo_dit(device: str | torch.device = "cpu", root: str | Path = ASSETS) -> DiT:
    """The demo DiT in eval mode, float32 (it is stored as float16 to keep the package small)."""
    return load_dit(demo_paths(root)["dit"], device=device)
