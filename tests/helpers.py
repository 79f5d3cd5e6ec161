"""Tiny random models shared by tests (built offline, fixed seeds)."""
from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from lgd.files import write_json, write_png
from lgd.models import DiT, create_dit, save_dit
from lgd.rundir import image_name, record_name


def tiny_dit(seed: int | None = 0, input_size: int = 4, num_classes: int = 3, **overrides) -> DiT:
    """DiT-T/2 with the DiT's own initialisation, its zero-initialised adaLN-Zero and output
    layers made small random, so the output depends on every input and the class (seed None:
    the caller's RNG state)."""
    if seed is not None:
        torch.manual_seed(seed)
    dit = create_dit("DiT-T/2", input_size=input_size, num_classes=num_classes, **overrides)
    with torch.no_grad():
        for p in dit.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return dit


def tiny_vae(image_channels: int = 3, blocks: tuple[int, ...] = (8, 8), groups: int = 8, seed: int | None = 0,
             **extra):
    """A random AutoencoderKL with 4-channel latents, one 2x downsampling per block after the
    first (seed None: the caller's RNG state)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=image_channels, out_channels=image_channels, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks, layers_per_block=1, norm_num_groups=groups, **extra,
    )


def tiny_vae_folder(path: Path, image_channels: int = 3) -> Path:
    """tiny_vae (2x downsampling) saved like the SD VAE."""
    tiny_vae(image_channels, sample_size=8).save_pretrained(path)
    return path


def tiny_dit_file(path: Path, num_classes: int = 3, input_size: int = 4) -> Path:
    save_dit(tiny_dit(0, input_size, num_classes), path)
    return path


def tiny_net(seed, channels=1, classes=3, size=8, dtype=torch.float64):
    """A ConvNet-3 of width 4 on 8x8 images (eval mode)."""
    from lgd.classifiers import build_classifier

    torch.manual_seed(seed)
    return build_classifier("convnet3", channels, classes, size, width=4).to(dtype).eval()


def influence_setup(dtype=torch.float64):
    """An influence loss over tiny_net with two random checkpoints and class targets from random images."""
    from lgd.guidance import InfluenceLoss
    from lgd.guidance.influence import class_mean_gradients

    model = tiny_net(0, dtype=dtype)
    checkpoints = []
    for e in range(2):
        torch.manual_seed(10 + e)
        checkpoints.append({k: torch.randn_like(v) * 0.3 for k, v in model.named_parameters()})
    real = torch.rand(12, 1, 8, 8, dtype=dtype)
    real_labels = torch.arange(12) % 3
    targets = torch.stack([class_mean_gradients(model, p, real, real_labels, 3) for p in checkpoints])
    return InfluenceLoss(model, checkpoints, targets)


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """An array as an IDX file (the format of the MNIST and Fashion-MNIST files)."""
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion_mnist(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST folder (gzipped IDX files of random 28 px images, classes in turn)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for stem, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        (root / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return root


def tiny_overrides(models, **extra) -> list[str]:
    """Config overrides for a whole run on tiny random models (DiT file, VAE folder) in seconds."""
    import json

    dit, vae = models
    values = {
        "model.dit": str(dit), "model.vae": str(vae), "data.image_size": 8,
        "sampling.steps": 6, "sampling.cfg_scale": 2.0, "sampling.batch_size": 2,  # one round per slot: 2 rounds per stage
        "stages.ipc": 4, "stages.increment": 2, "stages.initial": "igd",
        "lgd.kappa": 2, "lgd.window": [1, 4], "lgd.rho_scale": 0.01, "lgd.gamma": 0.5, "igd.gamma": 0.5,
        "lgd.stage_model": {"network": "convnet3", "recipe": "plain", "epochs": 2, "batch_size": 32},
        "lgd.reference_model": {"network": "convnet3", "recipe": "plain", "epochs": 1, "batch_size": 128},
        "igd.window": [2, 4], "igd.target_images": 5, "igd.checkpoints": 2, "igd.cos_threshold": 0.999,
        "igd.surrogate": {"network": "convnet3", "recipe": "plain", "epochs": 2, "batch_size": 256},
        "eval.baselines": ["dit"],
    }
    values.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


HOW_COMPUTED = ("environment.json", "history.jsonl", "log.txt")  # how a run was computed, not results


def files(run: Path) -> dict[str, bytes]:
    """Every output file of a run directory except hidden ones (the lock) and the records of
    how it was computed (thread and process counts, resumes)."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.relative_to(run).as_posix() not in HOW_COMPUTED}


def benchmark_module(name: str) -> ModuleType:
    """A module of benchmarks/ (not a package: pytest runs it with benchmarks/ on sys.path)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# A fake run directory's images: SET_CLASSES classes (the embedded Fashion-MNIST subset a fake
# run's config names) of SET_SIZE px patterns.
SET_SIZE, SET_CLASSES = 16, 10


def pattern(cls: int, size: int = SET_SIZE, noise: float = 0.1, generator=None) -> torch.Tensor:
    """A grey image whose bright row band encodes the class: easy to learn, easy to check."""
    img = noise * torch.rand(1, size, size, generator=generator)
    band = size // SET_CLASSES + 1
    start = (cls * size) // SET_CLASSES
    img[:, start : start + band] += 0.8
    return img.clamp(0, 1)


def write_set(root, stages: int, per_stage: int, single_stage: bool = False, seed: int = 0) -> None:
    """Images and records in the lgd.rundir layout; single_stage = a baseline made in one go."""
    g = torch.Generator().manual_seed(seed)
    for stage in range(1, stages + 1):
        for cls in range(SET_CLASSES):
            for k in range(per_stage):
                slot = (stage - 1) * per_stage + k
                st = 1 if single_stage else stage
                write_png(root / image_name(st, cls, slot), pattern(cls, generator=g))
                write_json(root / record_name(st, cls, slot),
                           {"file": image_name(st, cls, slot), "stage": st, "class": cls, "slot": slot})
