"""Train the demo VAE and DiT on Fashion-MNIST (32x32 grey) and write them into lgd/assets/demo.

    python -m lgd.demo.train vae --threads 2      # AutoencoderKL -> <out>/vae/ (25 minutes)
    python -m lgd.demo.train dit --threads 2      # DiT on the VAE's latents -> <out>/dit.safetensors (50 minutes)

Training runs for a wall-clock budget: the learning rate follows a cosine over the elapsed
fraction of `--minutes`, so a busy machine trains fewer steps rather than running over time.
Data: the full Fashion-MNIST training set (`lgd.data.load_dataset("fashion_mnist")`, from the
Debian package `dataset-fashion-mnist`). `python -m lgd.demo.quality` measures the result.
"""
from __future__ import annotations

import argparse
import copy
import math
import shutil
import time
from pathlib import Path

import torch

from lgd.demo.models import ASSETS, IMAGE_SIZE, NUM_CLASSES
from lgd.demo.quality import load_images, log, psnr
from lgd.diffusion import Diffusion
from lgd.models import DiT, create_dit, save_dit
from lgd.models.vae import LatentCodec, load_vae

VAE_CONFIG = dict(
    in_channels=1,
    out_channels=1,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3,  # 3 blocks = 2 downsamplings: 32 px -> 8 px
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)
DIT_BASE = "DiT-S/2"
DIT_OVERRIDES = dict(
    input_size=IMAGE_SIZE // 4, in_channels=4, hidden_size=192, depth=6, num_heads=3,
    num_classes=NUM_CLASSES, learn_sigma=True, class_dropout_prob=0.1,
)


def autocast():
    """bf16 autocast for the training steps: 1.7x the float32 step rate on this project's 2-core
    AVX-512 machines (measured for the VAE); the shipped weights stay float32 masters."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def lr_at(base: float, fraction: float, warmup: float = 0.02) -> float:
    """Linear warm-up over the first `warmup` of the budget, then cosine down to 5% of base."""
    if fraction < warmup:
        return base * fraction / warmup
    progress = min(1.0, (fraction - warmup) / (1.0 - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def make_readable(path: Path) -> None:
    """Mode 0644 for a file or a folder's files: the savers write through temp files (mode 0600),
    but package data must be readable by every user."""
    for f in path.iterdir() if path.is_dir() else [path]:
        f.chmod(0o644)


class Budget:
    """Wall-clock budget: elapsed fraction drives the LR schedule and the stop."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self.start = time.monotonic()

    @property
    def fraction(self) -> float:
        return (time.monotonic() - self.start) / self.seconds

    def batches(self, n: int, batch_size: int, generator: torch.Generator):
        """Shuffled index batches, epoch after epoch, until the budget is spent."""
        while True:
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                if self.fraction >= 1.0:
                    return
                if len(idx) == batch_size:
                    yield idx


# ---------------------------------------------------------------------------------------------
# VAE


def train_vae(args: argparse.Namespace) -> None:
    from diffusers import AutoencoderKL

    images, _ = load_images("train")
    test_images, _ = load_images("test")
    vae = AutoencoderKL(**VAE_CONFIG)
    log(f"VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, {len(images):,} training images")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    budget = Budget(args.minutes)
    step = 0
    for idx in budget.batches(len(images), args.batch_size, generator):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args.lr, budget.fraction)
        x = to_unit(images[idx]) * 2 - 1
        with autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator)).sample.float()
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        kl = posterior.kl().float().mean()  # per image, summed over the 8x8x4 latent
        loss = rec + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step} ({budget.fraction:.0%}): rec {rec.item():.4f} kl {kl.item():.1f}")
    vae.eval()
    log(f"VAE trained: {step} steps x {args.batch_size} images in {time.monotonic() - budget.start:.0f} s")

    # The DiT trains on latent means; 1/std of those makes them unit-variance (SD's 0.18215 rule).
    with torch.no_grad():
        sample = images[torch.randperm(len(images), generator=generator)[:5000]]
        dist = torch.cat([vae.encode(to_unit(b) * 2 - 1).latent_dist.mean for b in sample.split(500)])
        std = dist.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        post_std = torch.cat([vae.encode(to_unit(b) * 2 - 1).latent_dist.std for b in sample[:1000].split(500)])
    log(f"latents: mean {dist.mean().item():.3f} std {std:.3f} -> scaling_factor {1 / std:.4f}; "
        f"posterior std / latent std {post_std.mean().item() / std:.3f}")

    codec = LatentCodec(vae)
    with torch.no_grad():
        real = to_unit(test_images)
        recon = torch.cat([codec.decode(codec.encode(b)) for b in real.split(500)])
    log(f"test reconstruction PSNR {psnr(recon, real).mean().item():.2f} dB over {len(real)} images")

    out = Path(args.out) / "vae"
    tmp = out.with_name("vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    make_readable(out)
    log(f"wrote {out}")


# ---------------------------------------------------------------------------------------------
# DiT


@torch.no_grad()
def encode_all(codec: LatentCodec, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([codec.encode(to_unit(b)) for b in images.split(batch)])


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_dit(args: argparse.Namespace) -> None:
    out = Path(args.out)
    codec = load_vae(out / "vae")
    images, labels = load_images("train")
    start = time.monotonic()
    latents = encode_all(codec, images)
    log(f"encoded {len(latents):,} images in {time.monotonic() - start:.0f} s: latents {list(latents.shape[1:])}, "
        f"std {latents.std().item():.3f}")

    model = create_dit(DIT_BASE, **DIT_OVERRIDES)
    # DiT's std-0.02 class embeddings are ~1/50 of the timestep embedding's norm and take far more
    # steps than a CPU budget allows to grow (a first 2,600-step run barely told sandals from
    # sneakers); unit-std rows start at the timestep embedding's scale.
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=1.0)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    log(f"DiT: {sum(p.numel() for p in model.parameters()):,} parameters, {model.config}")
    diffusion = Diffusion(num_sampling_steps=50, learn_sigma=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    budget = Budget(args.minutes)
    step, window = 0, []
    model.train()
    for idx in budget.batches(len(latents), args.batch_size, generator):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args.lr, budget.fraction)
        x0, y = latents[idx], labels[idx]
        t = torch.randint(0, diffusion.num_train_timesteps, (len(idx),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        with autocast():
            terms = diffusion.training_losses(lambda x, tt: model(x, tt, y).float(), x0, t, noise)
        loss = terms["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        # Short runs: ramp the EMA decay up so early averages are not dominated by the random init.
        update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))
        step += 1
        window.append((terms["loss"].mean().item(), terms["mse"].mean().item(), terms["vb"].mean().item()))
        if step % 100 == 0:
            loss_m, mse_m, vb_m = (sum(v) / len(window) for v in zip(*window))
            log(f"dit step {step} ({budget.fraction:.0%}): loss {loss_m:.4f} mse {mse_m:.4f} vb {vb_m:.4f}")
            window = []
    log(f"DiT trained: {step} steps x {args.batch_size} latents in {time.monotonic() - budget.start:.0f} s")
    save_dit(ema.half(), out / "dit.safetensors")  # float16 storage halves the package size
    make_readable(out / "dit.safetensors")
    log(f"wrote {out / 'dit.safetensors'} (EMA weights, float16)")


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lgd.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("vae", "dit"))
    parser.add_argument("--out", default=str(ASSETS), help="folder holding vae/ and dit.safetensors")
    parser.add_argument("--minutes", type=float, help="wall-clock training budget (vae: 25, dit: 50)")
    parser.add_argument("--batch-size", type=int, help="vae: 128, dit: 256")
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate (vae: 1e-3, dit: 3e-4)")
    parser.add_argument("--kl-weight", type=float, default=1e-5, help="vae: KL weight (per-image KL sum)")
    parser.add_argument("--ema", type=float, default=0.999, help="dit: EMA decay of the shipped weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the dev machines are shared)")
    args = parser.parse_args(argv)
    defaults = {"vae": (25.0, 128, 1e-3), "dit": (50.0, 256, 3e-4)}[args.what]
    args.minutes = args.minutes if args.minutes is not None else defaults[0]
    args.batch_size = args.batch_size or defaults[1]
    args.lr = args.lr or defaults[2]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    {"vae": train_vae, "dit": train_dit}[args.what](args)


if __name__ == "__main__":
    main()
