"""`lgd sample`: unguided class-conditional CFG sampling to an ImageFolder-style PNG tree.

    python -m lgd sample --dit DiT-XL-2-256x256.pt --vae sd-vae-ft-mse/ --out samples/ \
        --classes 0 1 2 --per-class 10

The tree is built in a temporary sibling folder and renamed into place when complete, so an
interrupted run leaves no half-written output. Each image's noise comes from its own seed
(run seed, class, index): the output does not depend on the batch size.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from lgd.acceleration import PRECISIONS, apply_speedups
from lgd.errors import ConfigError, LgdError
from lgd.files import write_json, write_png
from lgd.kernels.policy import MODES, kernel_mode, resolve_mode
from lgd.models import load_dit
from lgd.models.loading import resolve_weights
from lgd.models.vae import IdentityCodec, load_vae
from lgd.progress import progress_bar
from lgd.runtime import resolve_device
from lgd.diffusion.sampler import Sampler, SamplerSettings
from lgd.seeding import NoiseStream, derive_seed


def load_codec(vae: str, channels: int, device) -> torch.nn.Module:
    """`identity` for pixel-space DiTs, else a local AutoencoderKL folder."""
    return IdentityCodec(channels) if vae == "identity" else load_vae(vae, device=device)


def class_folder(c: int) -> str:
    return f"{c:04d}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dit", required=True,
                        help="DiT checkpoint: official .pt, diffusers folder, lgd .safetensors, a hub id in the local Hugging Face cache, or 'demo'")
    parser.add_argument("--vae", required=True,
                        help="AutoencoderKL folder, a hub id in the local cache, 'identity' for pixel-space models, or 'demo'")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--classes", type=int, nargs="*", help="class indices (default: all)")
    parser.add_argument("--per-class", type=int, default=1, help="images per class")
    parser.add_argument("--steps", type=int, default=50, help="respaced sampling steps")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--cfg-channels", type=int, default=None, help="latent channels CFG applies to (3: the official DiT quirk; none: all)")
    parser.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm", help="reverse step")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every image's own noise stream")
    parser.add_argument("--batch-size", type=int, default=16, help="images denoised together")
    parser.add_argument("--num-heads", type=int, default=None, help="DiT heads, if not inferable from the checkpoint")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT and the VAE decoder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast dtype of the DiT and VAE (auto: bf16 on GPUs with native bf16, else fp32)")
    parser.add_argument("--kernels", choices=MODES, default="auto",
                        help="fused kernels: auto (those validated for the device), fused (all), torch (none); "
                             "$LGD_KERNELS overrides")


def run(args: argparse.Namespace) -> Path:
    with kernel_mode(resolve_mode(args.kernels)):
        return _sample(args)


def _sample(args: argparse.Namespace) -> Path:
    settings = SamplerSettings(args.steps, args.cfg_scale, args.cfg_channels, args.method, args.eta)
    settings.validate()
    if args.per_class < 1 or args.batch_size < 1:
        raise ConfigError("--per-class and --batch-size must be at least 1")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty")

    device = resolve_device(args.device)
    dit_path, vae_path = resolve_weights(args.dit, "--dit"), resolve_weights(args.vae, "--vae")
    dit = load_dit(dit_path, num_heads=args.num_heads, device=device)
    num_classes = dit.config.num_classes
    classes = list(range(num_classes)) if not args.classes else args.classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"class indices {bad} are outside the DiT's {num_classes} classes")
    codec = load_codec(vae_path, dit.config.in_channels, device)
    if codec.latent_channels != dit.config.in_channels:
        raise ConfigError(
            f"the VAE makes {codec.latent_channels}-channel latents but the DiT expects {dit.config.in_channels}"
        )
    dtype = apply_speedups(dit, codec, compile=args.compile, precision=args.precision)
    latent_shape = (dit.config.in_channels, dit.config.input_size, dit.config.input_size)
    sampler = Sampler(dit, settings, latent_shape)

    jobs = [(c, k, derive_seed(args.seed, "sample", c, k)) for c in classes for k in range(args.per_class)]
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed `lgd sample` to the same --out
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    records = []
    try:
        with progress_bar(total=len(jobs) * settings.steps, desc="sampling", unit="step", disable=args.no_progress) as bar:
            for start in range(0, len(jobs), args.batch_size):
                batch = jobs[start : start + args.batch_size]
                labels = torch.tensor([c for c, _, _ in batch], device=device)
                noise = NoiseStream([s for _, _, s in batch], device)
                try:
                    with torch.no_grad():
                        latents = sampler.sample(labels, noise, progress=_BatchProgress(bar, len(batch)))
                        images = codec.decode(latents)
                except torch.OutOfMemoryError:
                    raise LgdError(f"out of memory on {device} sampling a batch of {len(batch)} images; "
                                   f"rerun with --batch-size {max(1, len(batch) // 2)}") from None
                for (c, k, seed), image in zip(batch, images):
                    name = f"{class_folder(c)}/{k:05d}.png"
                    write_png(staging / name, image)
                    records.append({"file": name, "class": c, "index": k, "seed": seed})
        write_json(staging / "manifest.json", {
            "command": "sample",
            "dit": str(args.dit),
            "vae": str(args.vae),
            "settings": vars(settings),
            "compile": args.compile,
            "precision": str(dtype).removeprefix("torch."),
            "seed": args.seed,
            "images": records,
        })
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


class _BatchProgress:
    """Advances a step-counting bar by the batch size at every denoising step."""

    def __init__(self, bar, batch: int):
        self.bar, self.batch = bar, batch

    def update(self, n: int) -> None:
        self.bar.update(n * self.batch)
