"""Gaussian diffusion (DDPM / improved-DDPM / ADM maths): noising, Tweedie, DDPM and DDIM steps,
an unguided sampling loop and the hybrid training loss.

Two processes live side by side: the respaced one (N sampling steps, index i in [0, N-1],
i = N-1 noisiest) that every sampling method uses, and the full T-step one that
`training_losses` uses. Coefficients stay float64 on the CPU and are cast to the input's
dtype/device when gathered, so nothing is rounded to float32 before it is needed.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple

import torch

from lgd.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from lgd.diffusion.schedule import linear_betas, respaced_schedule
from lgd.errors import ConfigError

Index = int | torch.Tensor
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gather(values: torch.Tensor, i: Index, like: torch.Tensor) -> torch.Tensor:
    """values[i] cast to like's dtype/device, shaped to broadcast against `like`.

    `i` is a Python int (range-checked; returns a 0-dim tensor) or an integer tensor of shape
    [] or [B] (one index per sample; not range-checked, which would force a device sync).
    """
    if isinstance(i, torch.Tensor):
        if i.dtype.is_floating_point or i.dtype.is_complex or i.dtype == torch.bool:
            raise ConfigError(f"step indices must be an integer tensor, got dtype {i.dtype}")
        if i.ndim > 1 or (i.ndim == 1 and i.shape[0] != like.shape[0]):
            raise ConfigError(
                f"step indices must have shape [] or [{like.shape[0]}], got {list(i.shape)}"
            )
        picked = values.to(like.device)[i.to(like.device)].to(like.dtype)
        return picked.reshape(-1, *([1] * (like.ndim - 1))) if i.ndim == 1 else picked
    try:
        i = operator.index(i)
    except TypeError:
        raise ConfigError(f"a step index must be an int or an integer tensor, got {i!r}") from None
    if not 0 <= i < values.shape[0]:
        raise ConfigError(f"step index {i} is outside [0, {values.shape[0] - 1}]")
    return like.new_full((), float(values[i]))


class ProcessCoefficients:
    """Per-step float64 coefficients of one Gaussian diffusion defined by its betas."""

    def __init__(self, betas: torch.Tensor):
        betas = betas.to(torch.float64)
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([betas.new_ones(1), abar[:-1]])
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0): its variance is 0 at the first step, so the log is clipped to
        # the next step's value (the learned-range interpolation needs a finite lower end).
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)

    def __len__(self) -> int:
        return self.betas.shape[0]


class MeanVariance(NamedTuple):
    """The model's reverse-step Gaussian p(x_{t-1} | x_t) and the predictions it came from."""

    mean: torch.Tensor
    log_variance: torch.Tensor
    x0_hat: torch.Tensor
    eps: torch.Tensor


class Diffusion:
    """Linear-beta DDPM process respaced to `num_sampling_steps` (ADM/DiT conventions).

    `timesteps[i]` is the original training timestep of respaced index i: what the model is fed.
    With `learn_sigma` the model returns [eps, v] stacked on channels, v in [-1, 1] choosing the
    log variance between the posterior's (v=-1) and beta's (v=+1).
    """

    def __init__(
        self,
        num_sampling_steps: int = 50,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        learn_sigma: bool = True,
    ):
        if num_sampling_steps < 2:
            # ADM's rule keeps only t=0 for one step: no denoising would happen.
            raise ConfigError(f"num_sampling_steps must be >= 2, got {num_sampling_steps}")
        betas, timesteps = respaced_schedule(
            num_sampling_steps, num_train_timesteps, beta_start, beta_end
        )
        self.num_sampling_steps = num_sampling_steps
        self.num_train_timesteps = num_train_timesteps
        self.learn_sigma = learn_sigma
        self.timesteps = timesteps
        self.sampling = ProcessCoefficients(betas)
        self.training = ProcessCoefficients(linear_betas(num_train_timesteps, beta_start, beta_end))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Respaced cumulative alphas (float64 [N]); equal to the base ones at `timesteps`."""
        return self.sampling.alphas_cumprod

    # ---- noising and Tweedie -------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, i: Index, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) at respaced index i with the given standard-normal noise."""
        return _q_sample(self.sampling, x0, i, noise)

    def predict_x0(self, x_t: torch.Tensor, i: Index, eps: torch.Tensor) -> torch.Tensor:
        """Tweedie estimate E[x_0 | x_t] = (x_t - sqrt(1 - abar) eps) / sqrt(abar), unclipped."""
        return _predict_x0(self.sampling, x_t, i, eps)

    # ---- reverse steps -------------------------------------------------------------------
    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, i: Index, clip: bool = False
    ) -> MeanVariance:
        """Mean and log variance of p(x_{i-1} | x_i) (learned-range or fixed-small variance)."""
        return self._mean_variance(self.sampling, model_output, x_t, i, clip)

    def ddpm_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        i: Index,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral step x_i -> x_{i-1}; returns (x_prev, x0_hat). No noise is added at i == 0.

        An int i == 0 draws no noise; a tensor i always draws one noise tensor (masked where
        i == 0) so that batched steps never sync with the device.
        """
        out = self.p_mean_variance(model_output, x_t, i)
        if not isinstance(i, torch.Tensor) and i == 0:
            return out.mean, out.x0_hat
        scale = torch.exp(0.5 * out.log_variance)
        if isinstance(i, torch.Tensor):
            scale = scale * gather(_NONZERO, (i != 0).long(), x_t)
        return out.mean + scale * _draw_noise(x_t, generator, noise), out.x0_hat

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        i: Index,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM step x_i -> x_{i-1}; returns (x_prev, x0_hat). eta = 0 is deterministic.

        sigma = eta * sqrt(posterior variance); x_prev = sqrt(abar_prev) x0_hat
        + sqrt(1 - abar_prev - sigma^2) eps + sigma z. Only eps is read from a learned-sigma output.
        """
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"DDIM eta must be in [0, 1], got {eta}")
        eps, _ = self._split(model_output, x_t)
        proc = self.sampling
        x0_hat = _predict_x0(proc, x_t, i, eps)
        sigma_sq = eta**2 * proc.posterior_variance
        direction = (1.0 - proc.alphas_cumprod_prev - sigma_sq).clamp(min=0.0).sqrt()
        x_prev = (
            gather(proc.alphas_cumprod_prev.sqrt(), i, x_t) * x0_hat
            + gather(direction, i, x_t) * eps
        )
        # sigma is exactly 0 at i == 0 (posterior variance 0), so no mask is needed there.
        if eta > 0 and (isinstance(i, torch.Tensor) or i > 0):
            x_prev = x_prev + gather(sigma_sq.sqrt(), i, x_t) * _draw_noise(x_t, generator, noise)
        return x_prev, x0_hat

    # ---- training ------------------------------------------------------------------------
    def training_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample hybrid loss on the full T-step process at ORIGINAL timesteps t [B].

        loss = mse(eps) + vb, where vb is the variational-bound term (bits/dim) in which only
        the variance is trained: the mean is detached so the MSE alone shapes eps. vb is scaled
        by T/1000 (ADM's rescaling, 1 for the 1000-step process); zero without learn_sigma.
        """
        if t.ndim != 1 or t.shape[0] != x0.shape[0] or t.dtype.is_floating_point:
            raise ConfigError(
                f"t must be an integer tensor of shape [{x0.shape[0]}], "
                f"got {t.dtype} {list(t.shape)}"
            )
        if int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps:
            raise ConfigError(f"training timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        proc = self.training
        x_t = _q_sample(proc, x0, t, noise)
        model_output = model_fn(x_t, t)
        eps, v = self._split(model_output, x_t)
        mse = _mean_flat((noise - eps) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self._vb_bits_per_dim(frozen, x0, x_t, t) * (self.num_train_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb_bits_per_dim(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One term of the bound: decoder NLL at t = 0, KL(q posterior || p) otherwise."""
        proc = self.training
        true_mean = _posterior_mean(proc, x0, x_t, t)
        true_log_variance = gather(proc.posterior_log_variance_clipped, t, x_t)
        out = self._mean_variance(proc, model_output, x_t, t, clip=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    # ---- shared pieces -------------------------------------------------------------------
    def _split(
        self, model_output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            content = "eps and v" if self.learn_sigma else "eps only"
            raise ConfigError(
                f"model output has {model_output.shape[1]} channels, expected {expected} "
                f"({content}, learn_sigma={self.learn_sigma})"
            )
        if not self.learn_sigma:
            return model_output, None
        eps, v = model_output.split(channels, dim=1)
        return eps, v

    def _mean_variance(
        self,
        proc: ProcessCoefficients,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        i: Index,
        clip: bool,
    ) -> MeanVariance:
        eps, v = self._split(model_output, x_t)
        min_log = gather(proc.posterior_log_variance_clipped, i, x_t)
        if v is None:
            log_variance = min_log.expand_as(x_t)
        else:
            frac = (v + 1.0) / 2.0
            log_variance = frac * gather(proc.log_betas, i, x_t) + (1.0 - frac) * min_log
        x0_hat = _predict_x0(proc, x_t, i, eps)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean = _posterior_mean(proc, x0_hat, x_t, i)
        return MeanVariance(mean, log_variance, x0_hat, eps)


_NONZERO = torch.tensor([0.0, 1.0], dtype=torch.float64)  # gathered by (i != 0): a noise mask


def _q_sample(
    proc: ProcessCoefficients, x0: torch.Tensor, i: Index, noise: torch.Tensor
) -> torch.Tensor:
    return (
        gather(proc.sqrt_alphas_cumprod, i, x0) * x0
        + gather(proc.sqrt_one_minus_alphas_cumprod, i, x0) * noise
    )


def _predict_x0(
    proc: ProcessCoefficients, x_t: torch.Tensor, i: Index, eps: torch.Tensor
) -> torch.Tensor:
    return (
        gather(proc.sqrt_recip_alphas_cumprod, i, x_t) * x_t
        - gather(proc.sqrt_recipm1_alphas_cumprod, i, x_t) * eps
    )


def _posterior_mean(
    proc: ProcessCoefficients, x0: torch.Tensor, x_t: torch.Tensor, i: Index
) -> torch.Tensor:
    return (
        gather(proc.posterior_mean_coef1, i, x_t) * x0
        + gather(proc.posterior_mean_coef2, i, x_t) * x_t
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _draw_noise(
    like: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None
) -> torch.Tensor:
    """Standard-normal noise shaped like `like`: the explicit tensor, or drawn from the generator
    (on the generator's device, then moved, so a CPU generator gives the same draws anywhere)."""
    if noise is not None and generator is not None:
        raise ConfigError("pass either a generator or explicit noise to the step, not both")
    if noise is not None:
        if noise.shape != like.shape:
            raise ConfigError(f"noise has shape {list(noise.shape)}, expected {list(like.shape)}")
        return noise.to(like)
    if generator is None:
        raise ConfigError("a stochastic step needs a torch.Generator or explicit noise")
    drawn = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return drawn.to(like.device)
