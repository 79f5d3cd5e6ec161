"""Latent codecs: images in [0, 1] <-> scaled latents.

`LatentCodec` wraps a diffusers `AutoencoderKL` (the SD VAE for DiT-XL/2, or the small demo
VAE); `IdentityCodec` stands in for pixel-space models. Both keep the engine's conventions:
decode returns [0, 1] images (unclamped, so gradients survive) and latents carry the VAE's
scale factor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lgd.errors import CheckpointError

log = logging.getLogger(__name__)


class LatentCodec(nn.Module):
    """Encode/decode between [0, 1] images and `scale`-multiplied VAE latents."""

    def __init__(self, vae: nn.Module, scale: float | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(scale if scale is not None else vae.config.scaling_factor)
        config = vae.config
        self.image_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise CheckpointError(
                f"image size {image_size} is not a multiple of the VAE's downsampling factor "
                f"{self.downsample}"
            )
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        dist = self.vae.encode(images * 2 - 1).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
        return latents * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(latents / self.scale).sample + 1) / 2


class IdentityCodec(nn.Module):
    """Pixel-space stand-in: latents are the images mapped to [-1, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.image_channels = self.latent_channels = channels
        self.downsample = 1
        self.scale = 1.0

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.latent_channels, image_size, image_size)

    def encode(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents + 1) / 2


def _vae_folder(path: Path) -> Path:
    """The folder holding the AutoencoderKL config: the path itself or a pipeline's `vae/`."""
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    raise CheckpointError(
        f"no VAE at {path}: expected a diffusers AutoencoderKL folder (config.json + weights) "
        f"or a pipeline folder with a vae/ subfolder"
    )


def read_vae_config(path: str | Path) -> tuple[Path, dict]:
    """(the folder, its AutoencoderKL config.json) of a VAE folder or a pipeline's vae/; checked."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE path does not exist: {path}")
    folder = _vae_folder(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable VAE config {folder / 'config.json'}: {exc}") from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{folder} holds a {config['_class_name']}, not an AutoencoderKL")
    return folder, config


def vae_geometry(path: str | Path) -> tuple[int, int, int]:
    """(image channels, latent channels, downsampling factor) from the config alone, as
    LatentCodec derives them: what the generator's fit with the DiT and the data needs."""
    _, config = read_vae_config(path)
    return (int(config.get("in_channels", 3)), int(config.get("latent_channels", 4)),
            2 ** (len(config.get("block_out_channels", [64])) - 1))


def load_vae(path: str | Path, *, scale: float | None = None, device="cpu", dtype=None) -> LatentCodec:
    """Load a diffusers AutoencoderKL from a local folder (never from a hub)."""
    from diffusers import AutoencoderKL

    folder, _ = read_vae_config(path)
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"could not load the VAE weights in {folder}: {exc}") from None
    return LatentCodec(vae.to(device), scale=scale)


def fuse_group_norm_silu(decoder: nn.Module) -> int:
    """Swap each GroupNorm that is always followed by SiLU in a diffusers VAE decoder for the
    fused `GroupNormSiLU` (and the SiLU for an identity). Returns the number of norms fused.

    Covers the ResNet blocks without a time embedding (their `nonlinearity` then follows only
    norm1 and norm2) and the decoder's output head (conv_norm_out -> conv_act). Parameters and
    state_dict keys are unchanged; attention-block GroupNorms (no SiLU after) are left alone.
    """
    from diffusers.models.resnet import ResnetBlock2D

    from lgd.kernels.group_norm_silu import GroupNormSiLU

    def plain_gn(m):
        return type(m) is nn.GroupNorm

    fused = 0
    for block in decoder.modules():
        if (isinstance(block, ResnetBlock2D) and block.time_emb_proj is None
                and type(block.nonlinearity) is nn.SiLU and plain_gn(block.norm1) and plain_gn(block.norm2)):
            block.norm1 = GroupNormSiLU.from_group_norm(block.norm1)
            block.norm2 = GroupNormSiLU.from_group_norm(block.norm2)
            block.nonlinearity = nn.Identity()
            fused += 2
    if plain_gn(getattr(decoder, "conv_norm_out", None)) and type(getattr(decoder, "conv_act", None)) is nn.SiLU:
        decoder.conv_norm_out = GroupNormSiLU.from_group_norm(decoder.conv_norm_out)
        decoder.conv_act = nn.Identity()
        fused += 1
    return fused


def checkpoint_decoder_blocks(decoder: nn.Module) -> int:
    """Activation checkpointing for the decoder's mid block and each up block: a guided step then
    keeps only the blocks' inputs for backward and recomputes one block at a time (the peak of
    a DiT-XL/2 + SD-VAE LGD step drops by a third, BENCHMARKS.md; the cost is one more decoder
    forward). Applies only while grad is enabled, so unguided decoding is unchanged. Recomputed
    ops are the same ops on the same inputs: the gradients are those without checkpointing.
    Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    blocks = [decoder.mid_block, *decoder.up_blocks]
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return len(blocks)
