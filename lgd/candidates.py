"""The generative side of a run: the generator (DiT, latent codec, sampler) and the candidate
generator, which samples a batch of candidates, redraws the non-finite ones, decodes them and
keeps the best of each group of kappa (rank selection)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lgd.acceleration import apply_speedups
from lgd.config import Config, Problems
from lgd.diffusion.sampler import Guidance, Sampler, SamplerSettings
from lgd.errors import LgdError
from lgd.models import load_dit
from lgd.models.dit import DiTConfig
from lgd.models.loading import read_dit_config, resolve_weights
from lgd.models.vae import IdentityCodec, load_vae, vae_geometry
from lgd.planning import Job
from lgd.rundir import Finished
from lgd.seeding import NoiseStream, derive_seed

log = logging.getLogger(__name__)

MAX_REDRAWS = 3
# images, labels -> (S, CE_student, CE_reference, winners of each kappa-group)
Score = Callable[[torch.Tensor, torch.Tensor, int], tuple]


@dataclass
class Generator:
    """The generative side: DiT, latent codec and the sampling loops (guided, and unguided at
    sampling.unguided_cfg_scale)."""

    dit: torch.nn.Module
    codec: torch.nn.Module
    sampler: Sampler
    unguided_sampler: Sampler

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.sampler.diffusion.alphas_cumprod


@dataclass(frozen=True)
class Geometry:
    """What the generator's checkpoints say about it, read from headers and configs alone."""

    dit: DiTConfig
    image_channels: int
    latent_channels: int
    downsample: int
    dit_path: str  # resolved (demo, hub id in the local cache, or a path)
    vae_path: str  # "identity" for pixel-space DiTs

    @property
    def image_size(self) -> int:
        return self.dit.input_size * self.downsample


def read_geometry(config: Config) -> Geometry:
    """The generator's shapes without loading its weights; a DiT and VAE that do not fit
    each other or data.image_size are refused here, before a load of gigabytes."""
    dit_path = resolve_weights(config.model.dit, "model.dit")
    dit = read_dit_config(dit_path, num_heads=config.model.dit_num_heads)
    if config.model.vae == "identity":
        geometry = Geometry(dit, dit.in_channels, dit.in_channels, 1, dit_path, "identity")
    else:
        vae_path = resolve_weights(config.model.vae, "model.vae")
        geometry = Geometry(dit, *vae_geometry(vae_path), dit_path, vae_path)
    problems = Problems()
    problems.check(geometry.latent_channels == dit.in_channels,
                   f"the VAE makes {geometry.latent_channels}-channel latents; the DiT expects {dit.in_channels}")
    problems.check(geometry.image_size == config.data.image_size,
                   f"data.image_size {config.data.image_size} does not match the generator: DiT latents of "
                   f"{dit.input_size} px x VAE factor {geometry.downsample} = {geometry.image_size} px")
    problems.raise_if_any()
    return geometry


def load_generator(config: Config, device: torch.device, geometry: Geometry | None = None) -> Generator:
    """The generator's weights, once `read_geometry` (run here if not given) found them fitting."""
    geometry = geometry or read_geometry(config)
    dit = load_dit(geometry.dit_path, num_heads=config.model.dit_num_heads, device=device)
    dit.eval().requires_grad_(False).set_attention_backend(config.model.attention)
    if geometry.vae_path == "identity":
        codec = IdentityCodec(dit.config.in_channels)
    else:
        codec = load_vae(geometry.vae_path, device=device)
    codec.eval().requires_grad_(False)
    s = config.sampling
    if s.engine == "fast":  # speed switches (lgd/acceleration.py); the reference engine stays eager fp32
        apply_speedups(dit, codec, compile=s.compile, precision=s.precision, fp32_guidance=s.fp32_guidance,
                       checkpoint_decoder=s.checkpoint_decoder)
    settings = SamplerSettings(s.steps, s.cfg_scale, s.cfg_channels, s.method, s.eta)
    unguided = settings if s.unguided_cfg_scale is None else replace(settings, cfg_scale=s.unguided_cfg_scale)
    shape = (dit.config.in_channels, dit.config.input_size, dit.config.input_size)
    return Generator(dit, codec, Sampler(dit, settings, shape), Sampler(dit, unguided, shape))


class CandidateGenerator:
    """Candidates for (class, slot, candidate) jobs, each drawn from its own seeded noise.

    dit_classes maps a dataset class to the DiT's label; engine "fast" denoises a batch at once,
    "reference" one candidate at a time; `seed` is the run's.
    """

    def __init__(self, generator: Generator, dit_classes: list[int], device: torch.device, *,
                 engine: str = "fast", seed: int = 0, batch_size: int | None = None):
        self.generator, self.dit_classes, self.device = generator, dit_classes, device
        self.engine, self.seed, self.batch_size = engine, seed, batch_size

    def sample(self, seeds: list[int], classes: list[int], guidance: Guidance | None):
        """Final latents for the seeds, and the rows whose guidance or result was not finite."""
        rows = [list(range(len(seeds)))] if self.engine == "fast" else [[r] for r in range(len(seeds))]
        latents, failed = [], set()
        for batch in rows:
            targets = torch.tensor([classes[r] for r in batch], device=self.device)
            labels = torch.tensor([self.dit_classes[classes[r]] for r in batch], device=self.device)
            noise = NoiseStream([seeds[r] for r in batch], self.device)
            sampler = self.generator.sampler if guidance is not None else self.generator.unguided_sampler
            with torch.no_grad():
                latents.append(sampler.sample(labels, noise, guidance, targets=targets))
            if guidance is not None:
                failed |= {batch[r] for r in guidance.nonfinite.pop_failed()}
        latents = torch.cat(latents)
        failed |= set((~torch.isfinite(latents.flatten(1)).all(dim=1)).nonzero().squeeze(1).tolist())
        return latents, failed

    def batch(self, stage: int, jobs: list[Job], tag: str, guidance: Guidance | None, kappa: int = 1,
              score: Score | None = None) -> list[Finished]:
        """Sample the jobs, redraw NaN/inf candidates, keep each group's best (by `score`; the first
        candidate without one). Out of device memory ends in one line with what to change."""
        try:
            return self._batch(stage, jobs, tag, guidance, kappa, score)
        except torch.OutOfMemoryError:
            raise LgdError(out_of_memory_message(self.device, len(jobs), kappa, self.batch_size or len(jobs))) from None

    def _batch(self, stage, jobs, tag, guidance, kappa, score) -> list[Finished]:
        classes = [c for c, _, _ in jobs]
        seeds = [derive_seed(self.seed, tag, stage, *job, 0) for job in jobs]
        latents, failed = self.sample(seeds, classes, guidance)
        for attempt in range(1, MAX_REDRAWS + 1):
            if not failed:
                break
            rows = sorted(failed)
            log.warning("stage %d: redrawing %d non-finite candidate(s) (attempt %d)", stage, len(rows), attempt)
            for r in rows:
                seeds[r] = derive_seed(self.seed, tag, stage, *jobs[r], attempt)
            redrawn, bad = self.sample([seeds[r] for r in rows], [classes[r] for r in rows], guidance)
            latents[rows] = redrawn
            failed = {rows[b] for b in bad}
        if failed:
            raise LgdError(f"stage {stage}: candidates kept producing NaN/inf after {MAX_REDRAWS} redraws")

        targets = torch.tensor(classes, device=self.device)
        with torch.no_grad():
            images = self.generator.codec.decode(latents).clamp(0, 1)
        if score is not None:
            s_all, ce_s, ce_r, winners = score(images, targets, kappa)
            winners = winners.tolist()
        else:
            winners = list(range(0, len(jobs), kappa))
        finished = []
        for w in winners:
            cls, slot, cand = jobs[w]
            record = {"stage": stage, "class": cls, "slot": slot, "seed": seeds[w], "candidate": cand, "kind": tag}
            if score is not None:
                group = slice(w - cand, w - cand + kappa)
                record.update(S=s_all[w].item(), ce_student=ce_s[w].item(), ce_reference=ce_r[w].item(),
                              candidate_S=s_all[group].tolist())
            finished.append(Finished(stage, cls, slot, images[w].cpu(), latents[w].cpu(), record))
        return finished


def out_of_memory_message(device: torch.device, candidates: int, kappa: int, batch_size: int) -> str:
    """What to do after a sampling batch ran out of device memory (the run resumes where it stopped)."""
    where = str(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        where += f" ({total:.0f} GiB)"
    smaller = max(1, batch_size // 2 // kappa) * kappa
    if candidates <= kappa:
        return (f"out of memory on {where} sampling one group of {candidates} candidates (lgd.kappa={kappa}): "
                "a batch holds at least one group; lower lgd.kappa, use sampling.precision=bf16 without "
                "sampling.fp32_guidance, or a device with more memory")
    return (f"out of memory on {where} sampling a batch of {candidates} candidates (sampling.batch_size="
            f"{batch_size}); rerun the same command with sampling.batch_size={smaller}: finished images are kept "
            "and the run resumes where it stopped")
