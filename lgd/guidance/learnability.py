"""Learnability guidance (LGD, docs/method.md §4).

S(x, y) = CE(student(x), y) - omega * CE(reference(x), y): high where the current stage
model still gets x wrong but the reference model gets it right. Guidance evaluates S on the
decoded Tweedie estimate and moves x_{t-1} up its gradient w.r.t. x_t; rank selection keeps
the candidate of highest S in each group of kappa.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lgd.diffusion import DeviceTable
from lgd.guidance.common import NonFinite, to_classifier_input
from lgd.guidance.deviation import Deviation
from lgd.kernels import policy
from lgd.kernels.learnability import learnability as fused_learnability


def learnability(
    student: torch.nn.Module, reference: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
    omega: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (S, CE_student, CE_reference); S is differentiable w.r.t. the images.
    Where the kernel policy has a fused op for the device (Triton on CUDA, C++ on CPU), both
    CEs, S and dS/dlogits come from one pass; else from plain cross-entropies."""
    student_logits, reference_logits = student(images), reference(images)
    if policy.backend("learnability", student_logits.device) != "torch":
        result = fused_learnability(student_logits, reference_logits, labels, omega, kappa=1)
        return result.score, result.ce_student, result.ce_reference
    ce_student = F.cross_entropy(student_logits, labels, reduction="none")
    ce_reference = F.cross_entropy(reference_logits, labels, reduction="none")
    return ce_student - omega * ce_reference, ce_student, ce_reference


def top1_per_group(scores: torch.Tensor, kappa: int) -> torch.Tensor:
    """Index (into `scores`) of the highest score in each consecutive group of kappa."""
    groups = scores.view(-1, kappa)
    return groups.argmax(dim=1) + torch.arange(groups.shape[0], device=scores.device) * kappa


def guidance_scale(alpha_bar: torch.Tensor, eps: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """rho_t = sqrt(1 - alphabar_t) * ||eps|| / ||grad|| per sample, shaped to broadcast."""
    eps_norm = eps.detach().flatten(1).norm(dim=1)
    grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    rho = (1 - alpha_bar).sqrt() * eps_norm / grad_norm
    return rho.view(-1, *([1] * (eps.dim() - 1)))


class LearnabilityGuidance:
    """x_{t-1} += lam * rho_scale * rho_t * grad_{x_t} S, then deviation from the class memory.

    Samples whose gradient is not finite get no correction and are reported by
    `nonfinite.pop_failed()`, so the caller can drop and redraw them.
    """

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
        classifier_size: int | None = None,
    ):
        self.codec, self.student, self.reference = codec, student, reference
        self.alphas_cumprod = DeviceTable(alphas_cumprod)
        self.omega, self.lam, self.rho_scale = omega, lam, rho_scale
        self.window, self.deviation = window, deviation
        self.classifier_size = classifier_size
        self.nonfinite = NonFinite("learnability gradient")

    def active(self, i: int) -> bool:
        return self.window[0] <= i <= self.window[1]

    def __call__(self, x_t, i, eps, x0_hat, labels):
        images = to_classifier_input(self.codec.decode(x0_hat), self.classifier_size)
        scores, _, _ = learnability(self.student, self.reference, images, labels, self.omega)
        (grad,) = torch.autograd.grad(scores.sum(), x_t)
        grad = self.nonfinite.clean(grad)
        alpha_bar = self.alphas_cumprod.at(i, grad)
        rho = self.rho_scale * guidance_scale(alpha_bar, eps, grad)
        return self.lam * rho * grad + self.deviation(x_t, labels)
