"""Terms of the variational bound: Gaussian KL and the discretised-Gaussian decoder NLL."""
from __future__ import annotations

import torch


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, num_bins: int = 256
) -> torch.Tensor:
    """Elementwise log-probability (nats) of data x in [-1, 1] quantised to `num_bins` levels.

    Each value owns the bin [x - w/2, x + w/2] with w = 2 / (num_bins - 1); the two end bins
    extend to -inf / +inf so the probabilities sum to one. Uses the exact normal CDF, and for
    bins above the mean the mirrored upper tail, where a difference of two CDF values close to 1
    would cancel. Masses are floored at 1e-12 (as ADM does), so one badly predicted value costs
    at most ~27.6 nats and the t=0 loss term stays bounded.
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + half_bin)
    lower = inv_std * (x - means - half_bin)
    interior = torch.where(
        x > means,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    mass = torch.where(
        x < -0.999,
        torch.special.ndtr(upper),  # bottom bin: P(z < upper)
        torch.where(x > 0.999, torch.special.ndtr(-lower), interior),  # top bin: P(z > lower)
    )
    return torch.log(mass.clamp(min=1e-12))
