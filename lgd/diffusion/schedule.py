"""Noise schedules: the linear DDPM betas and ADM/DiT-style respacing to fewer sampling steps.

All maths is float64: alphas_cumprod at t=999 is ~4e-5, and respaced betas are ratios of
neighbouring cumulative products, so float32 would lose digits the sampler later amplifies.
"""
from __future__ import annotations

import torch

from lgd.errors import ConfigError


def linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """DDPM's linear schedule: `num_train_timesteps` betas evenly spaced, start to end (float64)."""
    if num_train_timesteps < 1:
        raise ConfigError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ConfigError(
            f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start} .. {beta_end}"
        )
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def space_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The original timesteps ADM keeps for the single-section spacing string "N".

    Evenly spaced from 0 to T-1 with the fractional stride (T-1)/(N-1), each position rounded
    (Python's round, accumulated as ADM does so the kept set is identical); N=1 keeps only 0.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(
            f"num_sampling_steps must be in [1, {num_train_timesteps}], got {num_steps}"
        )
    stride = 1.0 if num_steps == 1 else (num_train_timesteps - 1) / (num_steps - 1)
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    return kept


def respace_betas(alphas_cumprod: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """Betas of the shorter process that visits only `timesteps` (ascending) of the base one.

    beta_k = 1 - abar[t_k] / abar[t_{k-1}] (abar before the first kept step is 1), so the
    respaced process has exactly the base process's marginals q(x_t | x_0) at the kept steps.
    """
    kept = alphas_cumprod.to(torch.float64)[torch.as_tensor(timesteps, dtype=torch.long)]
    previous = torch.cat([kept.new_ones(1), kept[:-1]])
    return 1.0 - kept / previous


def respaced_schedule(
    num_sampling_steps: int,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas float64 [N], original timesteps long [N]): the linear schedule respaced to N steps."""
    base_betas = linear_betas(num_train_timesteps, beta_start, beta_end)
    alphas_cumprod = torch.cumprod(1.0 - base_betas, dim=0)
    timesteps = space_timesteps(num_train_timesteps, num_sampling_steps)
    return respace_betas(alphas_cumprod, timesteps), torch.tensor(timesteps, dtype=torch.long)


class DeviceTable:
    """A per-step host table (timesteps, alphas_cumprod) copied to the device once, at its first
    use there. `at(i, like)` is then an index into a device tensor: no host-to-device copy per
    denoising step (which would also rule out CUDA graphs). The values are those of
    `values.to(like)`, so results are unchanged."""

    def __init__(self, values: torch.Tensor):
        self.values = values
        self._copy = values

    def at(self, i: int, like: torch.Tensor, *, keep_dtype: bool = False) -> torch.Tensor:
        dtype = self.values.dtype if keep_dtype else like.dtype
        if self._copy.device != like.device or self._copy.dtype != dtype:
            self._copy = self.values.to(device=like.device, dtype=dtype)
        return self._copy[i]
