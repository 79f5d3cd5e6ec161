"""Gaussian diffusion: linear schedule, ADM respacing, DDPM/DDIM steps, hybrid loss, and the
class-conditional sampling loop (`lgd.diffusion.sampler`, imported from there: it needs the DiT)."""
from lgd.diffusion.gaussian import Diffusion, MeanVariance, ProcessCoefficients, gather
from lgd.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from lgd.diffusion.schedule import DeviceTable, linear_betas, respace_betas, respaced_schedule, space_timesteps

__all__ = [
    "DeviceTable",
    "Diffusion",
    "MeanVariance",
    "ProcessCoefficients",
    "gather",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "linear_betas",
    "respace_betas",
    "respaced_schedule",
    "space_timesteps",
]
