"""The denoising loop never waits on the device: no device-to-host read and no host-to-device
copy inside a step, guided or not (which would also rule out CUDA graphs).

The device is played by the meta device: an operation that reads a device value on the host
(.item(), bool(), .tolist(), nonzero) has no meta answer and fails, and every copy between the
host and the "device" is seen by a dispatch mode. The loop runs once to warm up (the one-time
copies of the schedule tables happen there), then again under the counter.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lgd.classifiers import build_classifier
from lgd.guidance import ClassMemory, Deviation, InfluenceGuidance, InfluenceLoss, LearnabilityGuidance
from lgd.models import create_dit
from lgd.models.vae import LatentCodec
from lgd.diffusion.sampler import Sampler, SamplerSettings

from tests.helpers import tiny_vae

META = torch.device("meta")
aten = torch.ops.aten
STEPS, BATCH, CLASSES = 4, 3, 3


class HostTraffic(TorchDispatchMode):
    """Records device reads on the host and copies across devices."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device == META:
            self.events.append("device value read on the host")
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            source = args[1] if func is aten.copy_.default else args[0]
            if isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) and source.device != out.device:
                self.events.append(f"copy {source.device} -> {out.device} ({func})")
        return out


class MetaNoise:
    """Stands in for NoiseStream, whose per-sample generators draw on the device itself."""

    def randn(self, *shape, dtype=torch.float32):
        return torch.zeros(BATCH, *shape, device=META, dtype=dtype)


def _models():
    with META:
        dit = create_dit("DiT-T/2", input_size=4, num_classes=CLASSES).eval().requires_grad_(False)
        vae = tiny_vae(3, seed=None, sample_size=8)
    codec = LatentCodec(vae, scale=0.18215).eval().requires_grad_(False)
    classifier = lambda: build_classifier("convnet3", 3, CLASSES, 8, width=8).to(META).eval().requires_grad_(False)
    return dit, codec, classifier


def _guidance(kind: str, sampler: Sampler, codec, classifier):
    memory = ClassMemory(4)
    for _ in range(4):
        memory.add(1, torch.randn(4, 4, 4))
    deviation = Deviation(memory, 1.0, META)
    window = (0, STEPS - 1)
    alphas = sampler.diffusion.alphas_cumprod
    if kind == "lgd":
        return LearnabilityGuidance(codec=codec, student=classifier(), reference=classifier(), alphas_cumprod=alphas,
                                    omega=0.5, lam=15.0, rho_scale=0.0015, window=window, deviation=deviation)
    surrogate = classifier()
    params = {k: torch.empty_like(v) for k, v in surrogate.named_parameters()}
    total = sum(v.numel() for v in params.values())
    loss = InfluenceLoss(surrogate, [params, params], torch.empty(2, CLASSES, total, device=META))
    return InfluenceGuidance(codec=codec, loss=loss, alphas_cumprod=alphas, k=5.0, rho_scale=0.0015,
                             window=window, deviation=deviation)


@pytest.mark.parametrize("kind", ["unguided", "lgd", "igd"])
def test_denoising_loop_has_no_host_traffic(kind):
    dit, codec, classifier = _models()
    sampler = Sampler(dit, SamplerSettings(STEPS, 4.0), (4, 4, 4))
    guidance = None if kind == "unguided" else _guidance(kind, sampler, codec, classifier)
    labels = torch.tensor([0, 1, 2], device=META)
    with torch.no_grad():
        sampler.sample(labels, MetaNoise(), guidance, targets=labels)  # warm-up: one-time table copies
        with HostTraffic() as traffic:
            latents = sampler.sample(labels, MetaNoise(), guidance, targets=labels)
    assert latents.shape == (BATCH, 4, 4, 4)
    assert traffic.events == []


def test_counter_sees_the_traffic_it_is_meant_to_catch():
    """The check can fail: a per-step host table copy and a host read are both caught."""
    x = torch.zeros(3, device=META)
    with HostTraffic() as traffic:
        x + torch.arange(3.0).to(META)  # what Sampler did before: timesteps[i].to(device) every step
        with pytest.raises(Exception):
            bool(x.any())  # a host read of a device value
    assert [e.split(" (")[0] for e in traffic.events] == ["copy cpu -> meta", "device value read on the host"]


def test_fused_learnability_checks_labels_without_a_host_read():
    from lgd.kernels import learnability as lrn

    logits = torch.zeros(6, 10, device=META)
    with HostTraffic() as traffic:
        lrn._check(logits, logits, torch.zeros(6, dtype=torch.long, device=META), 3)
    assert traffic.events == []
    with pytest.raises(lrn.KernelInputError, match="label 12 is out of range"):
        lrn._check(torch.zeros(3, 10), torch.zeros(3, 10), torch.tensor([0, 12, 1]), 3)
