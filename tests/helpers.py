"""Tiny random models shared by tests (built offline, fixed seeds)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from lgd.models import create_dit, save_dit


def tiny_vae_folder(path: Path, image_channels: int = 3) -> Path:
    """A random AutoencoderKL with 4-channel latents and 2x downsampling, saved like the SD VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=image_channels, out_channels=image_channels, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8, sample_size=8,
    )
    vae.save_pretrained(path)
    return path


def tiny_dit_file(path: Path, num_classes: int = 3, input_size: int = 4) -> Path:
    """A tiny DiT with randomised (not zero) output layers, so samples depend on the class."""
    torch.manual_seed(0)
    dit = create_dit("DiT-T/2", input_size=input_size, num_classes=num_classes)
    with torch.no_grad():
        for p in dit.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    save_dit(dit, path)
    return path


def benchmark_module(name: str) -> ModuleType:
    """A module of benchmarks/ (not a package: pytest runs it with benchmarks/ on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
