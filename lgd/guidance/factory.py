"""The one place a guidance is built from the config (the pipeline and the benchmarks use it)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from lgd.config import Config
from lgd.guidance.common import WindowedGuidance
from lgd.guidance.deviation import ClassMemory, Deviation
from lgd.guidance.influence import InfluenceGuidance, InfluenceLoss
from lgd.guidance.learnability import LearnabilityGuidance

GuidanceFactory = Callable[[list[int]], WindowedGuidance]


def guidance_factory(
    kind: str,
    config: Config,
    *,
    codec: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    memory: ClassMemory,
    device: torch.device | str = "cpu",
    student: torch.nn.Module | None = None,
    reference: torch.nn.Module | None = None,
    influence: InfluenceLoss | None = None,
) -> GuidanceFactory:
    """classes -> the `kind` ("lgd" or "igd") guidance of a batch whose samples are of those
    classes (deviation searches only their memories). LGD needs the stage model (`student`) and
    theta* (`reference`), IGD the influence loss; `sampling.engine=reference` gives IGD's
    one-image path."""
    if kind == "lgd":
        g = config.lgd
        if student is None or reference is None:
            raise ValueError("learnability guidance needs the student and the reference classifier")
        return lambda classes: LearnabilityGuidance(
            codec=codec, student=student, reference=reference, alphas_cumprod=alphas_cumprod,
            omega=g.omega, lam=g.lam, rho_scale=g.rho_scale, window=g.window,
            deviation=Deviation(memory, g.gamma, device, classes=classes))
    if kind == "igd":
        g = config.igd
        if influence is None:
            raise ValueError("influence guidance needs the influence loss")
        one_image = config.sampling.engine == "reference"
        return lambda classes: InfluenceGuidance(
            codec=codec, loss=influence, alphas_cumprod=alphas_cumprod, k=g.k, rho_scale=g.rho_scale,
            window=g.window, deviation=Deviation(memory, g.gamma, device, classes=classes),
            reference=one_image, decode_rows=g.decode_rows)
    raise ValueError(f"unknown guidance kind {kind!r}; choose lgd or igd")
