"""FLOPs and memory of the guided steps at ImageNette scale, counted on the meta device (shapes
only, no compute): the input of BENCHMARKS.md's projection of a full ImageNette run on one H100
and of the README's table of the candidate batch that fits a 40 / 80 GB GPU.

    pytest benchmarks/bench_projection.py --benchmark-only -q

DiT-XL/2 on 32x32x4 latents (256 px), the SD-VAE decoder (AutoencoderKL 128/256/512/512, two
layers per block), ConvNet-6 classifiers at 224 px, per image (batch 1): the fast LGD and IGD
guided steps, an unguided step, the final decode and the rank-selection scoring. Settings come
from the nette preset. The timed call is the counting itself and means nothing.
"""
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from _measure import count_flops, environment, live_peak
from _scenarios import CLASS, NUM_CLASSES, step_index

from lgd.classifiers import build_classifier
from lgd.config import Config, read_preset
from lgd.guidance import ClassMemory, InfluenceGuidance, InfluenceLoss, LearnabilityGuidance
from lgd.guidance.factory import guidance_factory
from lgd.models import create_dit
from lgd.models.vae import LatentCodec, checkpoint_decoder_blocks
from lgd.diffusion.sampler import Sampler, SamplerSettings

META = torch.device("meta")
SD_VAE = dict(  # the layout of sd-vae-ft-mse / sd-vae-ft-ema, the VAE of DiT-XL/2
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=256,
)


class MetaNoise:
    """Stands in for NoiseStream: shapes only."""

    def __init__(self, batch: int = 1):
        self.batch = batch

    def randn(self, *shape, dtype=torch.float32):
        return torch.zeros(self.batch, *shape, device=META, dtype=dtype)


def nette_settings() -> dict:
    preset, base = read_preset("nette"), Config()
    get = lambda section, key, default: preset.get(section, {}).get(key, default)
    return {
        "steps": get("sampling", "steps", base.sampling.steps),
        "cfg_scale": get("sampling", "cfg_scale", base.sampling.cfg_scale),
        "lgd_window": list(get("lgd", "window", base.lgd.window)),
        "igd_window": list(get("igd", "window", base.igd.window)),
        "kappa": get("lgd", "kappa", base.lgd.kappa),
        "increment": get("stages", "increment", base.stages.increment),
        "checkpoints": get("igd", "checkpoints", base.igd.checkpoints),
        "image_size": get("data", "image_size", 256),
        "classifier_size": get("data", "classifier_size", 224),
        "network": preset.get("lgd", {}).get("stage_model", {}).get("network", "convnet6"),
        "surrogate": preset.get("igd", {}).get("surrogate", {}).get("network", "convnet6"),
        "classes": NUM_CLASSES,
    }


@dataclass
class NetteStep:
    """DiT-XL/2, the SD-VAE codec, the classifiers and both guidances on the meta device, as the
    nette preset builds them (random weights; only shapes matter here)."""

    dit: nn.Module
    codec: LatentCodec
    sampler: Sampler
    student: nn.Module
    reference: nn.Module
    surrogate: nn.Module
    lgd: LearnabilityGuidance
    igd: InfluenceGuidance

    def nets(self, kind: str) -> list[nn.Module]:
        return [self.student, self.reference] if kind == "lgd" else [self.surrogate]


def nette_step(nette: dict, dtype: torch.dtype = torch.float32, checkpoint_decoder: bool = False) -> NetteStep:
    """`dtype` applies to the DiT and the codec (a bf16 model stands in for bf16 autocast, see
    guided_step_bytes); the classifiers stay fp32, as autocast leaves the guidance losses."""
    from diffusers import AutoencoderKL

    size = nette["classifier_size"]
    classifier = lambda name: build_classifier(name, 3, NUM_CLASSES, size).to(META).eval().requires_grad_(False)
    with META:
        dit = create_dit("DiT-XL/2").eval().requires_grad_(False).to(dtype)
        codec = LatentCodec(AutoencoderKL(**SD_VAE), scale=0.18215).eval().requires_grad_(False).to(dtype)
    if checkpoint_decoder:
        checkpoint_decoder_blocks(codec.vae.decoder)
    student, reference = classifier(nette["network"]), classifier(nette["network"])
    surrogate = classifier(nette["surrogate"])
    params = {k: torch.empty_like(v) for k, v in surrogate.named_parameters()}
    total = sum(v.numel() for v in params.values())
    influence = InfluenceLoss(surrogate, [params] * nette["checkpoints"],
                              torch.empty(nette["checkpoints"], NUM_CLASSES, total, device=META))
    sampler = Sampler(dit, SamplerSettings(nette["steps"], nette["cfg_scale"]), (4, 32, 32))
    # The nette preset's guidance from the pipeline's factory, guiding every step of the count;
    # meta tensors take the plain path: the fused op adds no FLOPs.
    preset = Config.from_dict(read_preset("nette"))
    window = (0, nette["steps"] - 1)
    config = dataclasses.replace(preset, lgd=dataclasses.replace(preset.lgd, window=window),
                                 igd=dataclasses.replace(preset.igd, window=window))
    build = lambda kind: guidance_factory(kind, config, codec=codec, alphas_cumprod=sampler.diffusion.alphas_cumprod,
                                          memory=ClassMemory(1), student=student, reference=reference,
                                          influence=influence)([CLASS])
    lgd, igd = build("lgd"), build("igd")
    return NetteStep(dit, codec, sampler, student, reference, surrogate, lgd, igd)


def count_all(nette: dict) -> dict:
    n = nette_step(nette)
    x = torch.zeros(1, 4, 32, 32, device=META)
    y = torch.full((1,), CLASS, device=META)
    step = lambda guidance: lambda: n.sampler.step(x, step_index(nette["steps"]), y, MetaNoise(), guidance, y)
    t = torch.zeros(1, device=META)

    def score():
        with torch.no_grad():
            images = n.codec.decode(x)  # each classifier resizes it to its input size
            n.student(images), n.reference(images)

    return {
        "lgd_step": count_flops(step(n.lgd)),
        "igd_step": count_flops(step(n.igd)),
        "unguided_step": count_flops(step(None)),
        "decode": count_flops(lambda: n.codec.decode(x)),
        "decode_and_score": count_flops(score),
        "dit_forward": count_flops(lambda: n.dit(x, t, y)),
    }


def test_flops_imagenette_scale(benchmark):
    nette = nette_settings()
    result = {}
    benchmark.group = "FLOP count at ImageNette scale (meta device)"
    benchmark.extra_info.update(
        kernel="flop_count", provider="meta", path="projection", nette=nette,
        models="DiT-XL/2 @ 32x32x4, SD-VAE decoder, ConvNet-6 @ 224 px", **environment(),
    )
    benchmark.pedantic(lambda: result.update(count_all(nette)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["counts"] = result
    assert result["lgd_step"]["dit"] > 0 and result["lgd_step"]["codec"] > 0


# ---------------------------------------------------------------------------------------------
# Memory: the candidate batch that fits a GPU
GiB = 2**30
# Usable memory of the cards (torch.cuda total_memory, less the CUDA context) and the share
# kept free for the caching allocator's fragmentation and cuDNN workspaces.
CARDS = {"40 GB (A100-40GB)": 39.4 * GiB, "80 GB (A100/H100-80GB)": 79.1 * GiB}
HEADROOM = 0.10
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_BATCH = 512


def guided_step_bytes(nette: dict, kind: str, dtype: torch.dtype, checkpoint_decoder: bool):
    """(weights, peak of one guided step as a function of the candidate batch) in bytes. A bf16
    DiT and codec stand in for bf16 autocast, which keeps fp32 weights (counted: fp32 + bf16
    copies) and runs norms in fp32 (not counted: the bf16 figure is a slight underestimate)."""
    n = nette_step(nette, dtype, checkpoint_decoder)
    guidance = n.lgd if kind == "lgd" else n.igd
    weights = sum(p.numel() * p.element_size() for m in (n.dit, n.codec, *n.nets(kind)) for p in m.parameters())
    if dtype != torch.float32:  # autocast keeps the fp32 weights and caches low-precision copies
        weights += sum(p.numel() * 4 for m in (n.dit, n.codec) for p in m.parameters())
    if kind == "igd":
        loss = n.igd.loss
        weights += sum(v.numel() * 4 for p in loss.checkpoints for v in p.values()) + loss.targets.numel() * 4

    def peak(batch: int) -> int:
        x = torch.zeros(batch, 4, 32, 32, device=META, dtype=dtype)
        y = torch.full((batch,), CLASS, device=META)
        with torch.no_grad():
            bytes_ = live_peak(lambda: n.sampler.step(x, step_index(nette["steps"]), y, MetaNoise(batch), guidance, y))
        guidance.nonfinite.mask = None  # the next call has another batch size (no failures on meta)
        return bytes_

    return weights, peak


def largest_batch(fits) -> int:
    """The largest batch b in 0..MAX_BATCH with fits(b) (fits is monotone), by bisection."""
    lo, hi = 0, MAX_BATCH
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def memory_rows(nette: dict) -> list[dict]:
    rows = []
    for kind in ("lgd", "igd"):
        for precision, dtype in PRECISIONS.items():
            for checkpointed in (False, True):
                weights, peak = guided_step_bytes(nette, kind, dtype, checkpointed)
                row = {"kind": kind, "precision": precision, "checkpoint_decoder": checkpointed,
                       "weights_bytes": weights, "per_batch": {}}
                for batch in (1, nette["batch_size"]):
                    row["per_batch"][batch] = weights + peak(batch)
                row["fits"] = {card: largest_batch(lambda b: weights + peak(b) <= (1 - HEADROOM) * usable)
                               for card, usable in CARDS.items()}
                rows.append(row)
    return rows


def test_memory_imagenette_scale(benchmark):
    """Peak memory of one guided step at the nette preset's batch, and the largest candidate batch
    that fits each card, per kind, precision and decoder checkpointing."""
    nette = {**nette_settings(), "batch_size": read_preset("nette")["sampling"]["batch_size"]}
    rows = []
    benchmark.group = "guided step memory at ImageNette scale (meta device)"
    benchmark.extra_info.update(
        kernel="memory_count", provider="meta", path="projection", nette=nette, headroom=HEADROOM,
        cards={k: v / GiB for k, v in CARDS.items()},
        models="DiT-XL/2 @ 32x32x4, SD-VAE decoder, ConvNet-6 @ 224 px", **environment(),
    )
    benchmark.pedantic(lambda: rows.extend(memory_rows(nette)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["rows"] = rows
    fp32 = next(r for r in rows if r["kind"] == "lgd" and r["precision"] == "fp32" and not r["checkpoint_decoder"])
    assert fp32["per_batch"][nette["batch_size"]] > fp32["per_batch"][1] > fp32["weights_bytes"]
