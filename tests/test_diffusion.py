"""Diffusion maths: schedule, respacing, DDPM/DDIM steps vs diffusers, Tweedie, sampling, loss."""
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lgd.diffusion import (
    Diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    space_timesteps,
)
from lgd.diffusion.sampler import Sampler, SamplerSettings
from lgd.errors import ConfigError
from lgd.seeding import NoiseStream

SHAPE = (2, 4, 4, 4)  # [B, C, H, W]: tiny latents
TOL = dict(rtol=1e-4, atol=1e-4)  # diffusers keeps its schedule in float32, we in float64


def _model_output(learn_sigma: bool = True) -> torch.Tensor:
    eps = torch.randn(SHAPE)
    if not learn_sigma:
        return eps
    v = torch.rand(SHAPE) * 2 - 1
    return torch.cat([eps, v], dim=1)


def _ddpm_scheduler(diffusion: Diffusion, variance_type: str) -> DDPMScheduler:
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=False,
    )
    sched.set_timesteps(timesteps=diffusion.timesteps.flip(0).tolist())
    return sched


# ---- schedule and respacing -----------------------------------------------------------------
def test_alphas_cumprod_match_diffusers():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    diffusion = Diffusion(num_sampling_steps=1000)
    assert diffusion.training.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(
        diffusion.training.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(linear_betas().float(), sched.betas)


def test_respacing_to_1000_steps_is_the_base_process():
    diffusion = Diffusion(num_sampling_steps=1000)
    assert diffusion.timesteps.tolist() == list(range(1000))
    torch.testing.assert_close(
        diffusion.sampling.betas, diffusion.training.betas, rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(
        diffusion.sampling.alphas_cumprod, diffusion.training.alphas_cumprod, rtol=1e-12, atol=0.0
    )


def test_respacing_to_50_steps_follows_adms_rule():
    diffusion = Diffusion(num_sampling_steps=50)
    kept = diffusion.timesteps.tolist()
    assert diffusion.timesteps.dtype == torch.long
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 50
    assert kept == [round(k * 999 / 49) for k in range(50)]
    assert kept[:6] == [0, 20, 41, 61, 82, 102]
    # respaced marginals equal the base marginals at the kept steps
    base_at_kept = diffusion.training.alphas_cumprod[diffusion.timesteps]
    torch.testing.assert_close(
        diffusion.sampling.alphas_cumprod, base_at_kept, rtol=1e-12, atol=0.0
    )
    assert space_timesteps(1000, 1) == [0]


def test_bad_configuration_is_rejected():
    with pytest.raises(ConfigError):
        Diffusion(num_sampling_steps=1001)
    with pytest.raises(ConfigError):
        Diffusion(num_sampling_steps=1)
    with pytest.raises(ConfigError):
        Diffusion(beta_start=0.03, beta_end=0.02)


# ---- DDPM step against diffusers --------------------------------------------------------------
@pytest.mark.parametrize("i", [49, 25, 1, 0])
def test_ddpm_learned_range_step_matches_diffusers(i):
    diffusion = Diffusion(num_sampling_steps=50, learn_sigma=True)
    sched = _ddpm_scheduler(diffusion, "learned_range")
    t = int(diffusion.timesteps[i])
    x_t, out = torch.randn(SHAPE), _model_output()

    ours = diffusion.p_mean_variance(out, x_t, i)
    x_prev, x0_hat = diffusion.ddpm_step(out, x_t, i, generator=torch.Generator().manual_seed(7))
    ref_prev, ref_x0 = sched.step(
        out, t, x_t, generator=torch.Generator().manual_seed(7), return_dict=False
    )

    torch.testing.assert_close(x0_hat, ref_x0, **TOL)
    torch.testing.assert_close(ours.x0_hat, ref_x0, **TOL)
    torch.testing.assert_close(x_prev, ref_prev, **TOL)  # same generator -> same noise
    if i == 0:  # no noise: the step is the posterior mean
        torch.testing.assert_close(ref_prev, ours.mean, **TOL)
        return
    # diffusers clamps the zero posterior variance to 1e-20 at t=0, ADM clips it: compare for i >= 1
    ref_log_var = sched._get_variance(t, predicted_variance=out[:, 4:])
    torch.testing.assert_close(ours.log_variance, ref_log_var, **TOL)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.mean, ref_prev - torch.exp(0.5 * ref_log_var) * z, **TOL)


@pytest.mark.parametrize("i", [49, 10, 1, 0])
def test_ddpm_fixed_small_step_matches_diffusers(i):
    diffusion = Diffusion(num_sampling_steps=50, learn_sigma=False)
    sched = _ddpm_scheduler(diffusion, "fixed_small")
    t = int(diffusion.timesteps[i])
    x_t, out = torch.randn(SHAPE), _model_output(learn_sigma=False)

    ours = diffusion.p_mean_variance(out, x_t, i)
    x_prev, x0_hat = diffusion.ddpm_step(out, x_t, i, generator=torch.Generator().manual_seed(3))
    ref_prev, ref_x0 = sched.step(
        out, t, x_t, generator=torch.Generator().manual_seed(3), return_dict=False
    )
    torch.testing.assert_close(x0_hat, ref_x0, **TOL)
    torch.testing.assert_close(x_prev, ref_prev, **TOL)
    if i > 0:
        ref_var = sched._get_variance(t).expand(SHAPE)
        torch.testing.assert_close(ours.log_variance.exp(), ref_var, **TOL)


def test_batched_indices_match_per_sample_steps():
    diffusion = Diffusion(num_sampling_steps=50)
    x_t, out = torch.randn(SHAPE), _model_output()
    idx = torch.tensor([40, 3])
    noise = torch.randn(SHAPE)
    x_prev, x0_hat = diffusion.ddpm_step(out, x_t, idx, noise=noise)
    for b, i in enumerate(idx.tolist()):
        row = slice(b, b + 1)
        row_prev, row_x0 = diffusion.ddpm_step(out[row], x_t[row], i, noise=noise[row])
        torch.testing.assert_close(x_prev[row], row_prev)
        torch.testing.assert_close(x0_hat[row], row_x0)
    # i == 0 inside a batch gets no noise
    x_prev0, _ = diffusion.ddpm_step(out, x_t, torch.tensor([0, 5]), noise=noise)
    mean0 = diffusion.p_mean_variance(out[:1], x_t[:1], 0).mean
    torch.testing.assert_close(x_prev0[:1], mean0)


# ---- DDIM against diffusers -----------------------------------------------------------------
def _ddim_reference(diffusion: Diffusion, i: int) -> tuple[DDIMScheduler, int]:
    """A DDIMScheduler whose fixed stride equals the gap to our previous kept timestep.

    DDIMScheduler steps by num_train_timesteps // num_inference_steps and has no custom
    timesteps, so num_inference_steps is chosen per step to give ADM's (uneven) gap.
    """
    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True
    )
    t = int(diffusion.timesteps[i])
    gap = t - int(diffusion.timesteps[i - 1]) if i > 0 else t + 1  # i == 0: step to abar = 1
    n = next(n for n in range(1, 1001) if 1000 // n == gap)
    sched.set_timesteps(n)
    return sched, t


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("i", [49, 30, 1, 0])
def test_ddim_step_matches_diffusers(i, eta):
    diffusion = Diffusion(num_sampling_steps=50)
    sched, t = _ddim_reference(diffusion, i)
    x_t, out = torch.randn(SHAPE), _model_output()
    noise = torch.randn(SHAPE)
    ref_prev, ref_x0 = sched.step(
        out[:, :4], t, x_t, eta=eta, variance_noise=noise, return_dict=False
    )
    x_prev, x0_hat = diffusion.ddim_step(out, x_t, i, eta=eta, noise=noise)
    torch.testing.assert_close(x0_hat, ref_x0, **TOL)
    torch.testing.assert_close(x_prev, ref_prev, **TOL)


def test_ddim_eta_one_has_the_posterior_variance():
    diffusion = Diffusion(num_sampling_steps=50, learn_sigma=False)
    x_t, out, i = torch.randn(SHAPE), _model_output(learn_sigma=False), 20
    noise = torch.randn(SHAPE)
    x_prev, _ = diffusion.ddim_step(out, x_t, i, eta=1.0, noise=noise)
    x_det, _ = diffusion.ddim_step(out, x_t, i, eta=0.0)
    x_mean = diffusion.ddim_step(out, x_t, i, eta=1.0, noise=torch.zeros(SHAPE))[0]
    std = (x_prev - x_mean) / noise
    posterior_std = diffusion.p_mean_variance(out, x_t, i).log_variance.mul(0.5).exp()
    torch.testing.assert_close(std, posterior_std)
    assert not torch.allclose(x_det, x_mean)


# ---- Tweedie --------------------------------------------------------------------------------
@pytest.mark.parametrize("i", [0, 17, 49])
def test_tweedie_inverts_q_sample(i):
    diffusion = Diffusion(num_sampling_steps=50)
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, i, eps)
    torch.testing.assert_close(diffusion.predict_x0(x_t, i, eps), x0, rtol=1e-10, atol=1e-10)
    idx = torch.full((SHAPE[0],), i)
    torch.testing.assert_close(diffusion.predict_x0(diffusion.q_sample(x0, idx, eps), idx, eps), x0)


def test_coefficients_follow_the_input_dtype():
    diffusion = Diffusion(num_sampling_steps=50)
    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    assert diffusion.q_sample(x, 10, x).dtype == torch.bfloat16
    assert diffusion.predict_x0(x, torch.tensor([1, 2]), x).dtype == torch.bfloat16


# ---- sampling loop --------------------------------------------------------------------------
def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == torch.long and t.shape == (x.shape[0],)
    eps = 0.5 * x + 1e-3 * t.view(-1, 1, 1, 1)
    return torch.cat([eps, torch.tanh(x)], dim=1)


class _ToyDiT:
    """What the sampler needs of a DiT: config.learn_sigma and dit(x, t, labels) (cfg_scale 1)."""

    config = SimpleNamespace(learn_sigma=True)

    def __init__(self, model=_toy_model):
        self.model = model

    def __call__(self, x, t, labels):
        return self.model(x, t)


def _sampler(steps: int, method: str = "ddpm", eta: float = 0.0, model=_toy_model) -> Sampler:
    settings = SamplerSettings(steps=steps, cfg_scale=1.0, method=method, eta=eta)
    return Sampler(_ToyDiT(model), settings, SHAPE[1:])


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_seeded_sampling_is_reproducible(method, eta):
    sampler = _sampler(10, method, eta)
    labels = torch.zeros(SHAPE[0], dtype=torch.long)

    def run(seed: int) -> torch.Tensor:
        return sampler.sample(labels, NoiseStream([seed + n for n in range(SHAPE[0])]))

    a, b, c = run(0), run(0), run(100)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sampling_calls_the_model_with_original_timesteps():
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    sampler = _sampler(5, "ddim", model=model)
    sampler.sample(torch.zeros(SHAPE[0], dtype=torch.long), NoiseStream(list(range(SHAPE[0]))))
    assert seen == sampler.diffusion.timesteps.flip(0).tolist() == [999, 749, 500, 250, 0]


def test_bad_step_input_is_rejected():
    diffusion = Diffusion(num_sampling_steps=50)
    x_t = torch.randn(SHAPE)
    with pytest.raises(ConfigError, match="channels"):
        diffusion.ddpm_step(torch.randn(SHAPE), x_t, 3, generator=torch.Generator())
    with pytest.raises(ConfigError, match="Generator"):
        diffusion.ddpm_step(_model_output(), x_t, 3)
    with pytest.raises(ConfigError, match="outside"):
        diffusion.predict_x0(x_t, 50, x_t)
    with pytest.raises(ConfigError, match="method"):
        _sampler(10, method="euler")


# ---- training loss --------------------------------------------------------------------------
class _SplitModel(torch.nn.Module):
    """eps from one parameter, v from another: shows where each loss term's gradient goes."""

    def __init__(self):
        super().__init__()
        self.eps_scale = torch.nn.Parameter(torch.tensor(0.3))
        self.v_bias = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t):
        return torch.cat([self.eps_scale * x, torch.tanh(x + self.v_bias)], dim=1)


def test_training_losses_hybrid_terms():
    diffusion = Diffusion(num_sampling_steps=50)
    model = _SplitModel()
    x0 = torch.rand(SHAPE) * 2 - 1
    noise = torch.randn(SHAPE)
    t = torch.tensor([0, 637])  # decoder NLL and KL branches
    losses = diffusion.training_losses(model, x0, t, noise)
    assert set(losses) == {"loss", "mse", "vb"}
    for value in losses.values():
        assert value.shape == (SHAPE[0],) and torch.isfinite(value).all()

    proc = diffusion.training
    x_t = (
        proc.sqrt_alphas_cumprod[t].float().view(-1, 1, 1, 1) * x0
        + proc.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1) * noise
    )
    manual_mse = ((noise - model.eps_scale * x_t) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], manual_mse)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])

    # vb trains the variance only: no gradient to the eps (mean) parameter
    eps_grad, v_grad = torch.autograd.grad(
        losses["vb"].sum(), [model.eps_scale, model.v_bias], allow_unused=True, retain_graph=True
    )
    assert eps_grad is None or eps_grad.abs().item() == 0.0
    assert v_grad is not None and v_grad.abs().item() > 0.0
    (mse_eps_grad,) = torch.autograd.grad(losses["mse"].sum(), [model.eps_scale])
    assert mse_eps_grad.abs().item() > 0.0


def test_training_losses_without_learned_sigma_is_plain_mse():
    diffusion = Diffusion(num_sampling_steps=50, learn_sigma=False)
    x0, noise, t = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([5, 999])
    losses = diffusion.training_losses(lambda x, t: 0.5 * x, x0, t, noise)
    assert torch.equal(losses["vb"], torch.zeros(SHAPE[0]))
    torch.testing.assert_close(losses["loss"], losses["mse"])
    with pytest.raises(ConfigError, match="timesteps"):
        diffusion.training_losses(lambda x, t: x, x0, torch.tensor([0, 1000]), noise)


def test_vb_helpers():
    mean, logvar = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(8))
    # KL(N(0,1) || N(1, e)) = 0.5 * (-1 + 1 + e^-1 + e^-1)
    kl = normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1))
    torch.testing.assert_close(kl, torch.tensor([math.exp(-1.0)]))
    # the 256 bins of the discretised Gaussian hold all the probability mass
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mu, log_scale in [(0.3, -3.0), (-0.95, -1.0), (0.999, -6.0)]:
        logp = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mu), torch.full_like(bins, log_scale)
        )
        total = torch.tensor(1.0, dtype=torch.float64)
        torch.testing.assert_close(logp.exp().sum(), total, rtol=1e-6, atol=1e-6)
    # a hopeless prediction costs a bounded amount (mass floored at 1e-12, as ADM)
    far = discretized_gaussian_log_likelihood(
        torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([1.0, 5.0, -1.0]), torch.full((3,), -8.0)
    )
    torch.testing.assert_close(far, torch.full((3,), math.log(1e-12)))
