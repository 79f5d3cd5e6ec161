"""Learnability guidance (LGD, docs/method.md §4).

S(x, y) = CE(student(x), y) - omega * CE(reference(x), y): high where the current stage
model still gets x wrong but the reference model gets it right. Guidance evaluates S on the
decoded Tweedie estimate and moves x_{t-1} up its gradient w.r.t. x_t; rank selection keeps
the candidate of highest S in each group of kappa.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lgd.guidance.common import WindowedGuidance
from lgd.guidance.deviation import Deviation
from lgd.kernels import policy
from lgd.kernels.learnability import LearnabilityResult, group_winners
from lgd.kernels.learnability import learnability as fused_learnability


class Learnability(NamedTuple):
    score: torch.Tensor  # [N] S, differentiable w.r.t. the images
    ce_student: torch.Tensor
    ce_reference: torch.Tensor
    winners: torch.Tensor  # [N // kappa] index of each group's highest S (the first on ties)


def learnability(
    student: torch.nn.Module, reference: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
    omega: float, kappa: int = 1,
) -> Learnability:
    """Per-sample S, CE_student and CE_reference, and rank selection over groups of kappa.
    Where the kernel policy has a fused op for the device (Triton on CUDA, C++ on CPU), all of
    it (and dS/dlogits) comes from one pass; else from plain cross-entropies."""
    student_logits, reference_logits = student(images), reference(images)
    if policy.backend("learnability", student_logits.device) != "torch":
        result: LearnabilityResult = fused_learnability(student_logits, reference_logits, labels, omega, kappa=kappa)
        return Learnability(result.score, result.ce_student, result.ce_reference, result.winners)
    ce_student = F.cross_entropy(student_logits, labels, reduction="none")
    ce_reference = F.cross_entropy(reference_logits, labels, reduction="none")
    score = ce_student - omega * ce_reference
    return Learnability(score, ce_student, ce_reference, group_winners(score.detach(), kappa))


def guidance_scale(alpha_bar: torch.Tensor, eps: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """rho_t = sqrt(1 - alphabar_t) * ||eps|| / ||grad|| per sample, shaped to broadcast."""
    eps_norm = eps.detach().flatten(1).norm(dim=1)
    grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    rho = (1 - alpha_bar).sqrt() * eps_norm / grad_norm
    return rho.view(-1, *([1] * (eps.dim() - 1)))


class LearnabilityGuidance(WindowedGuidance):
    """x_{t-1} += lam * rho_scale * rho_t * grad_{x_t} S, then deviation from the class memory."""

    def __init__(
        self,
        *,
        codec: torch.nn.Module,
        student: torch.nn.Module,
        reference: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        omega: float,
        lam: float,
        rho_scale: float,
        window: tuple[int, int],
        deviation: Deviation,
    ):
        super().__init__(alphas_cumprod, window, deviation, "learnability gradient")
        self.codec, self.student, self.reference = codec, student, reference
        self.omega, self.lam, self.rho_scale = omega, lam, rho_scale

    def gradient(self, x_t, x0_hat, labels):
        scores = learnability(self.student, self.reference, self.codec.decode(x0_hat), labels, self.omega).score
        return torch.autograd.grad(scores.sum(), x_t)[0]

    def step_size(self, alpha_bar, eps, grad):
        return self.lam * (self.rho_scale * guidance_scale(alpha_bar, eps, grad))
