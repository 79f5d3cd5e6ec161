"""The two generator configurations the guided-sampling benchmarks run, and the runs themselves.

    demo    the shipped demo generator: DiT (hidden 128, depth 4, patch 2) on 8x8x4 latents, the
            demo AutoencoderKL (32x32x1 <-> 8x8x4), ConvNet-3 classifiers at 32 px; guidance
            settings of the demo preset.
    dit-b2  DiT-B/2 (hidden 768, depth 12, 12 heads) on 32x32x4 latents, identity codec,
            ConvNet-3 classifiers on the 4-channel 32 px "images"; the paper's default settings.

Weights: the demo assets where they exist, else random weights of the same shapes (speed and
FLOPs do not depend on weight values; the zero-initialised adaLN layers of a fresh DiT are
re-drawn so that gradients are not trivially zero). Classifiers, the IGD surrogate checkpoints
and its class targets are random for the same reason.

Providers follow `sampling.engine`: "fast" denoises all candidates as one batch (fused
learnability op, batched vmap influence loss); "compiled" is "fast" with `sampling.compile`
(compiled DiT, VAE decoder and influence gradient; demo only, first call = compile);
"reference" one image at a time (plain learnability, one backward per surrogate checkpoint).
"influence-free" (IGD at the demo only) is "compiled" with the influence gradient replaced by
zeros and every other cost kept (decode, the backward through decoder and DiT, deviation): not
a way to sample, but the bound on what any faster influence gradient could give the compiled path.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lgd.acceleration import apply_speedups
from lgd.classifiers import build_classifier
from lgd.config import Config, load_config
from lgd.candidates import CandidateGenerator, Generator
from lgd.guidance import ClassMemory, InfluenceLoss
from lgd.guidance.factory import guidance_factory
from lgd.kernels.policy import kernel_mode
from lgd.models import DiT, create_dit
from lgd.models.vae import IdentityCodec, LatentCodec
from lgd.diffusion.sampler import Sampler, SamplerSettings
from lgd.seeding import NoiseStream

NUM_CLASSES = 10
CLASS = 3  # the class every candidate is drawn for (any class does the same work)
# The step benchmarked: respaced index 0.8 N of an N-step schedule, inside both guidance windows
# (defaults: LGD 10..45, IGD 30..45 of 50 -> 40; demo preset: 5..22, 15..22 of 25 -> 20).
STEP_FRACTION = 0.8


def step_index(steps: int) -> int:
    return round(STEP_FRACTION * steps)
KINDS = ("lgd", "igd")
PROVIDERS = ("fast", "compiled", "influence-free", "reference")
BATCHED = ("fast", "compiled", "influence-free")
COMPILED = ("compiled", "influence-free")  # first call compiles


def skip_unless_runnable(provider: str, config: str, kind: str) -> None:
    if provider in COMPILED and config != "demo":
        pytest.skip("compiled rows at the demo config only (compiling DiT-B/2 takes many minutes here)")
    if provider == "influence-free" and kind != "igd":
        pytest.skip("influence-free bounds IGD only")


class FreeInfluence(InfluenceLoss):
    """An influence loss whose input gradient costs nothing (zeros): the 'influence-free' bound."""

    def __init__(self, loss: InfluenceLoss):
        super().__init__(loss.model, loss.checkpoints, loss.targets)
        self.compiled = True  # InfluenceGuidance then takes the compiled route: one backward to x_t

    def input_gradient(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(images)


@dataclass
class Scenario:
    name: str
    config: Config  # guidance parameters, windows, kappa, E
    dit: DiT
    codec: nn.Module
    student: nn.Module
    reference: nn.Module
    influence: InfluenceLoss
    memory: ClassMemory
    weights: str
    codec_info: str

    @property
    def step_index(self) -> int:
        return step_index(self.config.sampling.steps)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.dit.config
        return (c.in_channels, c.input_size, c.input_size)

    def sampler(self, steps: int | None = None) -> Sampler:
        s = self.config.sampling
        settings = SamplerSettings(steps or s.steps, s.cfg_scale, s.cfg_channels, s.method, s.eta)
        return Sampler(self.dit, settings, self.latent_shape)

    def run_config(self, provider: str, steps: int | None = None) -> Config:
        """The config the pipeline would run `provider` under: its engine, and the guidance
        windows scaled to a `steps`-step schedule when given."""
        c = self.config
        engine = "reference" if provider == "reference" else "fast"
        scale = lambda section: dataclasses.replace(section, window=scaled_window(section.window, c.sampling.steps, steps))
        return dataclasses.replace(c, sampling=dataclasses.replace(c.sampling, engine=engine),
                                   lgd=scale(c.lgd), igd=scale(c.igd))

    def guidance(self, kind: str, provider: str, sampler: Sampler, steps: int | None = None):
        """The guidance the pipeline builds (lgd.guidance.factory) for `kind` under `provider`."""
        make = guidance_factory(kind, self.run_config(provider, steps), codec=self.codec,
                                alphas_cumprod=sampler.diffusion.alphas_cumprod, memory=self.memory,
                                student=self.student, reference=self.reference, influence=self.influence)
        return make([CLASS])

    def compiled(self) -> "Scenario":
        """This scenario with `sampling.compile`'s switches on copies of its DiT, codec and
        influence loss (built once; torch.compile compiles at the first call)."""
        if getattr(self, "_compiled", None) is None:
            dit, codec = copy.deepcopy(self.dit), copy.deepcopy(self.codec)
            apply_speedups(dit, codec, compile=True, precision="fp32")
            i = self.influence
            influence = InfluenceLoss(i.model, i.checkpoints, i.targets, compile=True)
            self._compiled = dataclasses.replace(self, dit=dit, codec=codec, influence=influence)
        return self._compiled

    def for_provider(self, provider: str) -> "Scenario":
        """The scenario a provider runs: compiled copies for "compiled" and "influence-free"."""
        if provider == "compiled":
            return self.compiled()
        if provider == "influence-free":
            compiled = self.compiled()
            return dataclasses.replace(compiled, influence=FreeInfluence(compiled.influence))
        return self

    def info(self) -> dict:
        """Sizes for extra_info."""
        d = self.dit.config
        return {
            "config": self.name, "weights": self.weights,
            "latent": list(self.latent_shape), "codec": self.codec_info,
            "image": [self.codec.image_channels] + [d.input_size * self.codec.downsample] * 2,
            "dit": {"hidden": d.hidden_size, "depth": d.depth, "heads": d.num_heads, "patch": d.patch_size,
                    "tokens": d.grid_size ** 2, "params": sum(p.numel() for p in self.dit.parameters())},
            "classifiers": f"{_network(self.config.lgd.stage_model)} @ {self.student.image_size} px",
            "surrogate": f"{_network(self.config.igd.surrogate)}, E={len(self.influence.checkpoints)} checkpoints",
            "kappa": self.config.lgd.kappa, "cfg_scale": self.config.sampling.cfg_scale,
        }


def _network(section) -> str:
    return section.network + ("" if section.width is None else f" width {section.width}")


def scaled_window(window: tuple[int, int], steps: int, new_steps: int | None) -> tuple[int, int]:
    """The window at the same fraction of a shorter schedule (index i of `steps` -> i*new/steps)."""
    if new_steps is None or new_steps == steps:
        return tuple(window)
    lo, hi = (min(new_steps - 1, round(i * new_steps / steps)) for i in window)
    return lo, hi


def guided_count(window: tuple[int, int], steps: int) -> int:
    return sum(window[0] <= i <= window[1] for i in range(steps))


# ---------------------------------------------------------------------------------------------
# Building


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _wake(dit: DiT, seed: int) -> DiT:
    """Re-draw the adaLN-Zero layers (zero at init, so the DiT output and its input gradient
    would be exactly zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
    return dit


def _classifiers(config: Config, channels: int, size: int, seed: int):
    torch.manual_seed(seed)
    def build(section):  # the network and width the config trains
        return _frozen(build_classifier(section.network, channels, NUM_CLASSES, size, **section.model_overrides()))

    student, reference = build(config.lgd.stage_model), build(config.lgd.reference_model)
    surrogate = build(config.igd.surrogate)
    gen = torch.Generator().manual_seed(seed)
    base = {k: v.detach() for k, v in surrogate.named_parameters()}
    checkpoints = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
                   for _ in range(config.igd.checkpoints)]
    params = sum(v.numel() for v in base.values())
    targets = torch.randn(config.igd.checkpoints, NUM_CLASSES, params, generator=gen)
    return student, reference, InfluenceLoss(surrogate, checkpoints, targets)


def _memory(config: Config, latent_shape, seed: int) -> ClassMemory:
    """A full class memory (a late stage): deviation guidance searches all of it every step."""
    memory = ClassMemory(config.lgd.memory)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(config.lgd.memory):
        memory.add(CLASS, torch.randn(latent_shape, generator=gen))
    return memory


def build_demo() -> Scenario:
    from lgd.demo.models import ASSETS, load_demo_dit
    from lgd.demo.train import DIT_BASE, DIT_OVERRIDES, VAE_CONFIG
    from lgd.models.vae import load_vae

    config = load_config("demo")
    if (ASSETS / "dit.safetensors").exists():
        dit, dit_weights = load_demo_dit(), "demo assets"
    else:
        torch.manual_seed(0)
        dit, dit_weights = _wake(create_dit(DIT_BASE, **DIT_OVERRIDES), 0), "random"
    if (ASSETS / "vae" / "config.json").exists():
        codec, vae_weights = load_vae(ASSETS / "vae"), "demo assets"
    else:
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        codec, vae_weights = LatentCodec(AutoencoderKL(**VAE_CONFIG)), "random"
    blocks = list(codec.vae.config.block_out_channels)
    size = config.data.classifier_input
    student, reference, influence = _classifiers(config, codec.image_channels, size, seed=1)
    return Scenario(
        name="demo", config=config, dit=_frozen(dit), codec=_frozen(codec), student=student,
        reference=reference, influence=influence, memory=_memory(config, _latent(dit), 2),
        weights=f"DiT {dit_weights}, VAE {vae_weights}",
        codec_info=f"AutoencoderKL {blocks} 32x32x1 <-> 8x8x4")


def build_dit_b2() -> Scenario:
    # The paper's defaults (docs/method.md), with ConvNet-3 classifiers to keep them small.
    small = lambda section: dataclasses.replace(section, network="convnet3")
    base = Config()
    config = dataclasses.replace(
        base,
        lgd=dataclasses.replace(base.lgd, stage_model=small(base.lgd.stage_model),
                                reference_model=small(base.lgd.reference_model)),
        igd=dataclasses.replace(base.igd, surrogate=small(base.igd.surrogate)),
    )
    torch.manual_seed(0)
    dit = _wake(create_dit("DiT-B/2", input_size=32, num_classes=NUM_CLASSES), 0)
    codec = IdentityCodec(dit.config.in_channels)
    student, reference, influence = _classifiers(config, codec.image_channels, 32, seed=1)
    return Scenario(
        name="dit-b2", config=config, dit=_frozen(dit), codec=_frozen(codec), student=student,
        reference=reference, influence=influence, memory=_memory(config, _latent(dit), 2),
        weights="random", codec_info="identity 32x32x4")


def _latent(dit: DiT) -> tuple[int, int, int]:
    c = dit.config
    return (c.in_channels, c.input_size, c.input_size)


BUILDERS: dict[str, Callable[[], Scenario]] = {"demo": build_demo, "dit-b2": build_dit_b2}


# ---------------------------------------------------------------------------------------------
# Runs


def kernels_for(provider: str) -> str:
    """The kernel mode the pipeline runs a provider's engine under (reference: plain ops only)."""
    return "torch" if provider == "reference" else "auto"


def _batches(provider: str, images: int) -> list[list[int]]:
    """Seeds per call of the sampler: one batch (fast) or one image at a time (reference)."""
    seeds = list(range(1000, 1000 + images))
    return [seeds] if provider in BATCHED else [[s] for s in seeds]


def step_run(scn: Scenario, kind: str, provider: str, images: int) -> Callable[[], None]:
    """One guided reverse step (index `scn.step_index`) for `images` candidates."""
    scn = scn.for_provider(provider)
    sampler = scn.sampler()
    guidance = scn.guidance(kind, provider, sampler)
    gen = torch.Generator().manual_seed(0)
    work = []
    for seeds in _batches(provider, images):
        x = torch.randn((len(seeds), *scn.latent_shape), generator=gen)
        work.append((seeds, x, torch.full((len(seeds),), CLASS)))

    def run() -> None:
        with kernel_mode(kernels_for(provider)):
            for seeds, x, labels in work:
                with torch.no_grad():  # as the pipeline calls the sampler; the step enables grad itself
                    sampler.step(x, scn.step_index, labels, NoiseStream(seeds), guidance, labels)
        guidance.nonfinite.pop_failed()

    return run


def sampling_run(scn: Scenario, kind: str, provider: str, images: int, steps: int) -> Callable[[], None]:
    """A whole unit through the pipeline's own `CandidateGenerator.sample` (fast: one batch,
    reference: one image at a time), `steps` respaced steps, guidance inside the scaled window."""
    scn = scn.for_provider(provider)
    sampler = scn.sampler(steps)
    guidance = scn.guidance(kind, provider, sampler, steps)
    generator = Generator(scn.dit, scn.codec, sampler, unguided_sampler=sampler)  # every unit here is guided
    candidates = CandidateGenerator(generator, list(range(NUM_CLASSES)),
                                    torch.device("cpu"), engine=scn.run_config(provider).sampling.engine)
    seeds = list(range(1000, 1000 + images))

    def run() -> None:
        with kernel_mode(kernels_for(provider)):
            candidates.sample(seeds, [CLASS] * len(seeds), guidance)

    return run


def sampling_schedule(scn: Scenario, kind: str, steps: int) -> dict:
    section = scn.config.lgd if kind == "lgd" else scn.config.igd
    full = scn.config.sampling.steps
    window = scaled_window(section.window, full, steps)
    return {"steps": steps, "window": list(window), "guided_steps": guided_count(window, steps),
            "full_steps": full, "full_window": list(section.window),
            "full_guided_steps": guided_count(section.window, full)}
