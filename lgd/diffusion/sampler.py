"""The class-conditional sampling loop: the one loop of unguided, IGD and LGD sampling.

One loop, i = N-1 .. 0: model output with classifier-free guidance, a DDPM (or DDIM) step,
and, inside a guidance window, a correction computed from gradients w.r.t. x_t. Autograd
graphs are built only at guided steps.

A guidance with `null_rows = True` (IGD's official decode, igd.decode_rows=both) also gets the
null-class row of the CFG batch, carried as the official sampler carries it: a second latent
per sample that starts equal to x_T, takes the guided eps with the null pass's variance and
its own noise, and is never guided; guidance then sees x0_hat of both rows (2B rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lgd.diffusion.gaussian import Diffusion
from lgd.diffusion.schedule import DeviceTable
from lgd.errors import ConfigError
from lgd.seeding import NoiseStream


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_channels: int | None = None  # None: all latent channels; 3: the official DiT quirk
    method: str = "ddpm"  # or "ddim"
    eta: float = 0.0  # DDIM only

    def validate(self) -> None:
        """The one definition of valid sampling settings (the config and `lgd sample` use it)."""
        if not 2 <= self.steps <= 1000:
            raise ConfigError(f"sampling.steps must be in 2..1000, got {self.steps}")
        if not 1.0 <= self.cfg_scale <= 50.0:
            raise ConfigError(f"sampling.cfg_scale must be in [1, 50], got {self.cfg_scale}")
        if self.method not in ("ddpm", "ddim"):
            raise ConfigError(f"sampling.method must be ddpm or ddim, got {self.method!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"sampling.eta must be in [0, 1], got {self.eta}")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ConfigError(f"sampling.cfg_channels must be positive or null, got {self.cfg_channels}")


class Guidance(Protocol):
    """A correction added to x_{t-1}, computed from the graph of the current step."""

    def active(self, i: int) -> bool: ...

    def __call__(
        self, x_t: torch.Tensor, i: int, eps: torch.Tensor, x0_hat: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor: ...


class Sampler:
    """Draws latents from a class-conditional DiT with CFG, optionally guided."""

    def __init__(self, dit: torch.nn.Module, settings: SamplerSettings, latent_shape: tuple[int, int, int]):
        settings.validate()
        self.dit = dit
        self.settings = settings
        self.latent_shape = tuple(latent_shape)
        learn_sigma = dit.config.learn_sigma
        self.diffusion = Diffusion(num_sampling_steps=settings.steps, learn_sigma=learn_sigma)
        self.timesteps = DeviceTable(self.diffusion.timesteps)

    def model_output(self, x: torch.Tensor, i: int, labels: torch.Tensor, both_rows: bool = False) -> torch.Tensor:
        t = self.timesteps.at(i, x, keep_dtype=True).expand(x.shape[0])
        s = self.settings
        if s.cfg_scale == 1.0:
            return self.dit(x, t, labels)
        return self.dit.forward_with_cfg(x, t, labels, s.cfg_scale, s.cfg_channels, both_rows=both_rows)

    def step(
        self, x: torch.Tensor, i: int, labels: torch.Tensor, noise: NoiseStream,
        guidance: Guidance | None = None, targets: torch.Tensor | None = None, null: "NullRow | None" = None,
    ):
        """One reverse step from index i; returns (x_{i-1}, x0_hat), both detached.
        `labels` condition the DiT; `targets` (default: labels) are the classes guidance sees;
        `null` (updated in place) the null-class rows of a guidance with null_rows."""
        guided = guidance is not None and guidance.active(i)
        step_noise = noise.randn(*self.latent_shape).to(x.dtype)
        with torch.set_grad_enabled(guided):
            x_t = x.detach().requires_grad_(guided)
            out = self.model_output(x_t, i, labels, both_rows=null is not None)
            rows, rows_noise = x_t, step_noise
            if null is not None:
                rows = torch.cat([x_t, null.x])
                rows_noise = torch.cat([step_noise, null.noise.randn(*self.latent_shape).to(x.dtype)])
            if self.settings.method == "ddpm":
                x_prev, x0_hat = self.diffusion.ddpm_step(out, rows, i, noise=rows_noise)
            else:
                x_prev, x0_hat = self.diffusion.ddim_step(out, rows, i, eta=self.settings.eta, noise=rows_noise)
            if null is not None:
                x_prev, null.x = x_prev[: len(x_t)], x_prev[len(x_t) :].detach()
            if guided:
                eps = out[: len(x_t), : self.latent_shape[0]]
                x_prev = x_prev + guidance(x_t, i, eps, x0_hat, labels if targets is None else targets)
        return x_prev.detach(), x0_hat[: len(x_t)].detach()

    def sample(
        self, labels: torch.Tensor, noise: NoiseStream, guidance: Guidance | None = None, progress=None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final latents for `labels`, one noise stream per sample (seeded, batch-independent)."""
        x = noise.randn(*self.latent_shape)
        null = None
        if getattr(guidance, "null_rows", False) and self.settings.cfg_scale != 1.0:
            null = NullRow(x.clone(), noise.derived("cfg-null-row"))
        for i in reversed(range(self.settings.steps)):
            x, _ = self.step(x, i, labels, noise, guidance, targets, null)
            if progress is not None:
                progress.update(1)
        return x


@dataclass
class NullRow:
    """The null-class rows of the CFG batch and their own noise (see the module docstring)."""

    x: torch.Tensor
    noise: NoiseStream
