"""How good a demo generator is, measured against real Fashion-MNIST.

    python -m lgd.demo.quality --generator lgd/assets/demo --json quality.json --pictures DIR

- **Reconstruction**: the VAE's PSNR on the real test images (posterior mean, clamped to [0, 1]),
  and a picture of real images above their reconstructions.
- **Unguided samples, per CFG scale**: top-1 accuracy of a ConvNet-3 trained on the real
  training set; the *feature Fréchet distance*: the Fréchet distance between Gaussians fitted to
  that ConvNet's pooled last-block features of the samples and of the real test images (FID's
  formula in another feature space, so not comparable with FID), beside the same distance from an
  equally large set of real training images (its floor, the sampling noise of the estimate);
  and per-class diversity: the mean pairwise feature distance within a class, averaged over the
  classes, as a fraction of the same figure for real images.

Needs the full Fashion-MNIST (Debian package `dataset-fashion-mnist`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lgd.demo.models import ASSETS, IMAGE_SIZE, NUM_CLASSES, demo_paths
from lgd.diffusion.sampler import Sampler, SamplerSettings
from lgd.models import DiT, load_dit
from lgd.models.vae import LatentCodec, load_vae
from lgd.seeding import NoiseStream, derive_seed


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_images(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, 1, 32, 32], long [N]) of the full Fashion-MNIST split (root: its IDX folder)."""
    from lgd.data import load_dataset

    data = load_dataset("fashion_mnist", split, root, image_size=IMAGE_SIZE)
    return data.images, data.labels


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0, 1] images (a is clamped to [0, 1] first)."""
    mse = ((a.clamp(0, 1) - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows * cols, C, H, W] -> one [C, rows * H, cols * W] image (row-major)."""
    n, c, h, w = images.shape
    cols = n // rows
    return images[: rows * cols].reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


@torch.no_grad()
def generate(dit: DiT, codec: LatentCodec, labels: torch.Tensor, cfg_scale: float, steps: int,
             seed: int, batch: int = 250) -> torch.Tensor:
    """Decoded [0, 1] images for `labels`: DDPM with learned variance and CFG on all channels."""
    shape = (dit.config.in_channels, dit.config.input_size, dit.config.input_size)
    sampler = Sampler(dit, SamplerSettings(steps=steps, cfg_scale=cfg_scale), shape)
    out = []
    for start, y in zip(range(0, len(labels), batch), labels.split(batch)):
        z = sampler.sample(y, NoiseStream([derive_seed(seed, "quality", start + n) for n in range(len(y))]))
        out.append(codec.decode(z).clamp(0, 1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Feature-space statistics


@torch.no_grad()
def features(classifier, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """ConvNet pooled last-block features (float64 [N, width]) of [0, 1] images."""
    out = [classifier.features(classifier.prepare(b)).mean((2, 3)) for b in images.split(batch)]
    return torch.cat(out).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to feature rows."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric matrix
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def diversity(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise Euclidean feature distance within a class, averaged over the classes
    (of at least two images)."""
    per_class = []
    for c in labels.unique():
        f = feats[labels == c]
        if len(f) < 2:
            continue
        d = torch.cdist(f, f)
        per_class.append(d.sum() / (len(f) * (len(f) - 1)))
    return float(torch.stack(per_class).mean())


def real_data_classifier(epochs: int, seed: int, cache: Path | None):
    """ConvNet-3 (width 128) trained on the real 32 px training set; loaded from / saved to `cache`."""
    from lgd.classifiers import build_classifier
    from lgd.config import TrainSection
    from lgd.training import accuracy, train_classifier

    classifier = build_classifier("convnet3", 1, NUM_CLASSES, IMAGE_SIZE)
    if cache is not None and cache.is_file():
        classifier.load_state_dict(torch.load(cache, weights_only=True))
        return classifier.eval()
    section = TrainSection(network="convnet3", recipe="plain", epochs=epochs, lr=0.01, batch_size=128)
    start = time.monotonic()
    train_classifier(classifier, load_images("train"), section, seed=seed, progress=False)
    log(f"ConvNet-3 trained on real data ({epochs} epoch(s)) in {time.monotonic() - start:.0f} s: "
        f"real test accuracy {accuracy(classifier, load_images('test')):.1%}")
    if cache is not None:
        torch.save(classifier.state_dict(), cache)
    return classifier.eval()


# ---------------------------------------------------------------------------------------------
# The measurement


def measure(generator: Path, cfg_scales: list[float], per_class: int, steps: int, seed: int,
            classifier, pictures: Path | None = None, root: str | Path | None = None) -> dict:
    from lgd.files import write_png

    paths = demo_paths(generator)
    dit, codec = load_dit(paths["dit"]), load_vae(paths["vae"])
    train_images, train_labels = load_images("train", root)
    test_images, test_labels = load_images("test", root)
    real_test = test_images.float() / 255
    with torch.no_grad():
        recon = torch.cat([codec.decode(codec.encode(b)) for b in real_test.split(500)])
    result = {
        "generator": str(generator),
        "parameters": {"dit": sum(p.numel() for p in dit.parameters()),
                       "vae": sum(p.numel() for p in codec.vae.parameters())},
        "reconstruction_psnr_db": float(psnr(recon, real_test).mean()),
        "test_images": len(real_test),
    }
    log(f"{generator}: test reconstruction PSNR {result['reconstruction_psnr_db']:.2f} dB")
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
        first = torch.stack([torch.nonzero(test_labels == c)[:8, 0] for c in range(NUM_CLASSES)], 1).flatten()
        pair = torch.stack([real_test[first], recon[first].clamp(0, 1)], 1).flatten(0, 1)
        write_png(pictures / "reconstructions.png", image_grid(pair, 8))  # columns: real, reconstruction

    test_feats = features(classifier, real_test)
    n = per_class * NUM_CLASSES
    g = torch.Generator().manual_seed(seed)
    real_idx = torch.cat([idx[torch.randperm(len(idx), generator=g)[:per_class]]
                          for idx in (torch.nonzero(train_labels == c)[:, 0] for c in range(NUM_CLASSES))])
    real_feats = features(classifier, train_images[real_idx].float() / 255)
    real_labels = train_labels[real_idx]
    real_diversity = diversity(real_feats, real_labels)
    result["real"] = {"images": n, "frechet_floor": frechet_distance(real_feats, test_feats),
                      "diversity": real_diversity}
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    result["samples"] = []
    for cfg in cfg_scales:
        start = time.monotonic()
        fake = generate(dit, codec, labels, cfg, steps, seed)
        with torch.no_grad():
            top1 = float((torch.cat([classifier(b).argmax(1) for b in fake.split(500)]) == labels).float().mean())
        feats = features(classifier, fake)
        row = {"cfg_scale": cfg, "steps": steps, "images": n, "top1": top1,
               "frechet": frechet_distance(feats, test_feats),
               "diversity_vs_real": diversity(feats, labels) / real_diversity,
               "seconds": round(time.monotonic() - start, 1)}
        result["samples"].append(row)
        log(f"CFG {cfg}: top-1 {top1:.1%}, feature Frechet {row['frechet']:.3g} "
            f"(real floor {result['real']['frechet_floor']:.3g}), diversity {row['diversity_vs_real']:.2f} x real")
        if pictures is not None:
            rows = fake.reshape(NUM_CLASSES, per_class, *fake.shape[1:])[:, :10].flatten(0, 1)
            write_png(pictures / f"samples_cfg{cfg:g}.png", image_grid(rows, NUM_CLASSES))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lgd.demo.quality", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--generator", default=str(ASSETS), help="folder holding vae/ and dit.safetensors")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--per-class", type=int, default=100, help="samples (and real images) per class")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (the demo preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="the real-data ConvNet-3's epochs")
    parser.add_argument("--classifier", help="cache file for the real-data ConvNet-3 (reused if present)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--pictures", help="folder for reconstructions.png and samples_cfg<scale>.png")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    classifier = real_data_classifier(args.epochs, args.seed, Path(args.classifier) if args.classifier else None)
    result = measure(Path(args.generator), args.cfg_scales, args.per_class, args.steps, args.seed, classifier,
                     Path(args.pictures) if args.pictures else None)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
