"""What the guidance kinds share (`WindowedGuidance`): the window, the step size's table,
deviation, and the handling of non-finite gradients. The sampler's side of the contract is
`lgd.diffusion.sampler.Guidance`."""
from __future__ import annotations

import logging
import torch

from lgd.diffusion import DeviceTable
from lgd.guidance.deviation import Deviation

log = logging.getLogger(__name__)


class NonFinite:
    """Zeroes the rows of per-sample gradients that hold NaN/inf and remembers them, without a
    host sync per step; `failed` (one sync) lists them so the caller drops and redraws them."""

    def __init__(self, what: str):
        self.what = what
        self.mask: torch.Tensor | None = None

    def clean(self, grad: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(grad.flatten(1)).all(dim=1)
        self.mask = ~finite if self.mask is None else self.mask | ~finite
        return torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad, torch.zeros_like(grad))

    def pop_failed(self) -> set[int]:
        """The rows that failed since the last call, then reset."""
        rows = set() if self.mask is None else set(self.mask.nonzero().squeeze(1).tolist())
        self.mask = None
        if rows:
            log.warning("non-finite %s for batch rows %s: those candidates will be redrawn", self.what, sorted(rows))
        return rows


class WindowedGuidance:
    """x_{t-1} += step_size(alphabar_t, eps, g) * g + deviation(x_t), g = gradient(...), in the window.

    A subclass gives the gradient of its objective w.r.t. x_t and its step size (both kinds scale
    it by rho_t, from sqrt(1 - alphabar_t) and the size of eps against that of g). Rows whose
    gradient is not finite get no correction and are reported by `nonfinite.pop_failed()`, so
    the caller can drop and redraw them.
    """

    null_rows = False  # whether the sampler also passes the null-class rows of the CFG batch

    def __init__(self, alphas_cumprod: torch.Tensor, window: tuple[int, int], deviation: Deviation, what: str):
        self.alphas_cumprod = DeviceTable(alphas_cumprod)
        self.window, self.deviation = window, deviation
        self.nonfinite = NonFinite(what)

    def active(self, i: int) -> bool:
        return self.window[0] <= i <= self.window[1]

    def gradient(self, x_t: torch.Tensor, x0_hat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step_size(self, alpha_bar: torch.Tensor, eps: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x_t, i, eps, x0_hat, labels):
        grad = self.nonfinite.clean(self.gradient(x_t, x0_hat, labels))
        alpha_bar = self.alphas_cumprod.at(i, grad)
        return self.step_size(alpha_bar, eps, grad) * grad + self.deviation(x_t, labels)
