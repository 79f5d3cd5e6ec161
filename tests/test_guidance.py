"""Guidance maths: IGD's double backward, LGD raising S, deviation, rank selection."""
import pytest
import torch
import torch.nn.functional as F

from lgd.guidance import ClassMemory, Deviation, LearnabilityGuidance, learnability
from lgd.kernels.learnability import group_winners
from lgd.guidance.deviation import cosine_gradient
from lgd.guidance.influence import select_checkpoints
from lgd.kernels.policy import kernel_mode
from lgd.models.vae import IdentityCodec
from lgd.diffusion.sampler import Sampler, SamplerSettings
from lgd.seeding import NoiseStream
from tests.helpers import influence_setup, tiny_dit, tiny_net


def test_influence_gradient_matches_finite_differences():
    loss = influence_setup()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2])
    (grad,) = torch.autograd.grad(loss.batched(x, y).sum(), x)
    h = 1e-6
    generator = torch.Generator().manual_seed(0)
    for flat_index in torch.randint(0, x.numel(), (6,), generator=generator).tolist():
        bump = torch.zeros_like(x).view(-1)
        bump[flat_index] = h
        bump = bump.view_as(x)
        with torch.no_grad():
            numeric = (loss.batched(x + bump, y).sum() - loss.batched(x - bump, y).sum()) / (2 * h)
        assert numeric.item() == pytest.approx(grad.view(-1)[flat_index].item(), rel=1e-4, abs=1e-8)


def test_batched_influence_equals_one_image_per_checkpoint_path():
    loss = influence_setup()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 2])
    batched = loss.batched(x, y)
    (grad_batched,) = torch.autograd.grad(batched.sum(), x)
    for b in range(3):
        per_checkpoint = loss.per_checkpoint(x[b], y[b])
        assert torch.stack(per_checkpoint).mean().item() == pytest.approx(batched[b].item(), rel=1e-10)
        grads = [torch.autograd.grad(part, x, retain_graph=True)[0][b] for part in per_checkpoint]
        torch.testing.assert_close(sum(grads) / len(grads), grad_batched[b], rtol=1e-9, atol=1e-12)


def test_checkpoint_selection_keeps_first_and_dissimilar():
    model = tiny_net(0)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.manual_seed(1)
    other = {k: torch.randn_like(v) for k, v in base.items()}
    trajectory = [base, base, other, other, base]
    real = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(6) % 3
    kept, targets = select_checkpoints(model, trajectory, real, labels, 3, count=3, threshold=0.7)
    assert kept == [0, 2, 4]  # identical neighbours (cosine 1) are skipped
    assert targets.shape[:2] == (3, 3)
    kept, targets = select_checkpoints(model, trajectory[:3], real, labels, 3, count=4, threshold=0.7)
    assert kept == [0, 2] and targets.shape[0] == 2  # fewer than asked: the ones found, with a warning


def test_cosine_gradient_matches_autograd():
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    m = torch.randn(4, 10, dtype=torch.float64)
    (auto,) = torch.autograd.grad(F.cosine_similarity(x, m, dim=1).sum(), x)
    torch.testing.assert_close(cosine_gradient(x.detach(), m), auto)


def test_deviation_moves_away_from_most_similar_memory_entry():
    memory = ClassMemory(capacity=2)
    torch.manual_seed(0)
    entries = torch.randn(3, 4, 2, 2)
    for e in entries:
        memory.add(1, e)
    assert memory.entries(1).shape == (2, 16)  # capacity keeps the most recent two
    x = entries[2] + 0.1 * torch.randn(4, 2, 2)
    labels = torch.tensor([1, 0])
    step = Deviation(memory, gamma=1.0)(torch.stack([x, x]), labels)
    assert torch.all(step[1] == 0)  # class 0 has no memory
    memory.add(0, -entries[2])  # another class's entry must not be chosen for a class-1 sample
    torch.testing.assert_close(Deviation(memory, gamma=1.0)(x[None], labels[:1]), step[:1])
    before = F.cosine_similarity(x.flatten(), entries[2].flatten(), dim=0)
    after = F.cosine_similarity((x + step[0]).flatten(), entries[2].flatten(), dim=0)
    assert after < before


def test_rank_selection_is_the_first_argmax_of_each_group():
    scores = torch.tensor([0.1, 0.5, 0.2, 3.0, -1.0, 2.0, 0.0, 0.0, 0.0])
    assert group_winners(scores, 3).tolist() == [1, 3, 6]
    torch.manual_seed(0)
    scores = torch.randn(40)
    winners = group_winners(scores, 4)
    assert torch.equal(scores[winners], scores.view(10, 4).max(dim=1).values)


def learnability_sampler():
    dit = tiny_dit(0, input_size=8, in_channels=1, learn_sigma=True).eval()
    return Sampler(dit.requires_grad_(False), SamplerSettings(steps=10, cfg_scale=2.0), (1, 8, 8))


def test_learnability_guidance_raises_S_over_unguided_from_the_same_noise():
    sampler = learnability_sampler()
    codec = IdentityCodec(1)
    student, reference = tiny_net(1, dtype=torch.float32), tiny_net(2, dtype=torch.float32)
    for net in (student, reference):
        net.requires_grad_(False)
    labels = torch.tensor([0, 1, 2, 0])

    def gain(seeds, lam):
        guidance = LearnabilityGuidance(
            codec=codec, student=student, reference=reference, alphas_cumprod=sampler.diffusion.alphas_cumprod,
            omega=0.5, lam=lam, rho_scale=0.01, window=(1, 8), deviation=Deviation(ClassMemory(4), 0.0))
        with torch.no_grad():
            plain = sampler.sample(labels, NoiseStream(seeds))
            guided = sampler.sample(labels, NoiseStream(seeds), guidance)
            s_plain = learnability(student, reference, codec.decode(plain), labels, 0.5)[0]
            s_guided = learnability(student, reference, codec.decode(guided), labels, 0.5)[0]
        assert not guidance.nonfinite.pop_failed()
        return s_guided - s_plain

    gains = torch.stack([gain([seed * 10 + k for k in range(4)], lam=15.0) for seed in range(4)])
    assert (gains > 0).all(), gains  # every sample of every seed
    torch.testing.assert_close(gain([0, 1, 2, 3], lam=0.0), torch.zeros(4))  # control: no guidance, no change


def test_nonfinite_gradient_marks_candidate_failed():
    sampler = learnability_sampler()
    student = tiny_net(1, dtype=torch.float32).requires_grad_(False)

    class Poisoned(torch.nn.Module):
        def forward(self, images):
            out = student(images)
            return torch.cat([out[:1] * float("nan"), out[1:]])

    guidance = LearnabilityGuidance(
        codec=IdentityCodec(1), student=Poisoned(), reference=student,
        alphas_cumprod=sampler.diffusion.alphas_cumprod, omega=0.5, lam=15.0, rho_scale=0.01,
        window=(1, 8), deviation=Deviation(ClassMemory(4), 0.0))
    with torch.no_grad():
        latents = sampler.sample(torch.tensor([0, 1]), NoiseStream([1, 2]), guidance)
    assert guidance.nonfinite.pop_failed() == {0}
    assert torch.isfinite(latents[1]).all()


@pytest.mark.parametrize("shape", [(4, 3), (9, 10)])
def test_fused_learnability_equals_plain_with_gradients(shape):
    n, classes = shape
    torch.manual_seed(n)
    student = torch.nn.Linear(8, classes)
    reference = torch.nn.Linear(8, classes)
    labels = torch.randint(0, classes, (n,))
    results = []
    for mode in ("torch", "fused"):
        x = torch.randn(n, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with kernel_mode(mode):
            s, ce_s, ce_r, winners = learnability(student, reference, x, labels, 0.5, kappa=2 if n % 2 == 0 else 3)
        (grad,) = torch.autograd.grad(s.sum(), x)
        results.append((s, ce_s, ce_r, grad, winners))
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_influence_input_gradient_equals_autograd_through_batched(batch):
    """The fast path's torch.func gradient w.r.t. the images (what the compiled path compiles)
    equals autograd's double backward through `batched`, and needs no graph from its input."""
    loss = influence_setup()
    x = torch.rand(batch, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.arange(batch) % 3
    (expected,) = torch.autograd.grad(loss.batched(x, y).sum(), x)
    with torch.no_grad():
        actual = loss.input_gradient(x, y)
    assert not actual.requires_grad
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)
