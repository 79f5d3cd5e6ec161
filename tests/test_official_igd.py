"""IGD's official mode against a re-implementation of the official sampler's influence step.

The official sampler carries both rows of the classifier-free-guidance batch (the sample and
its null-class twin, which starts equal and then takes its own noise), decodes the Tweedie
estimates of both into the influence loss, labelled with the sample's class, and guides the
conditional row by the gradient of their sum. Written here from that description,
independently of lgd.diffusion.sampler.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lgd.diffusion import Diffusion
from lgd.guidance import ClassMemory, Deviation, InfluenceGuidance
from lgd.models.vae import IdentityCodec
from lgd.diffusion.sampler import NullRow, Sampler, SamplerSettings
from lgd.seeding import NoiseStream
from tests import helpers
from tests.helpers import influence_setup

STEPS, CFG, K, RHO = 6, 3.0, 5.0, 0.0015
SHAPE = (1, 8, 8)  # a pixel-space DiT on 1-channel 8x8 "images" (identity codec), as the tiny surrogate takes


def tiny_dit():
    return helpers.tiny_dit(0, input_size=8, in_channels=1).eval().requires_grad_(False)


def official_correction(dit, loss, x_cond, x_null, i, label):
    """The official IGD step's guidance term for one sample (batch of two CFG rows)."""
    diffusion = Diffusion(num_sampling_steps=STEPS, learn_sigma=True)
    x = torch.cat([x_cond, x_null]).requires_grad_(True)
    t = diffusion.timesteps[i].expand(2)
    y = torch.tensor([label, dit.config.num_classes])  # the sample's class, then the null class
    half = x[:1]
    out = dit(torch.cat([half, half]), t, y)  # the official forward_with_cfg: both rows see x[:half]
    eps, rest = out[:, :1], out[:, 1:]
    guided = eps[1:] + CFG * (eps[:1] - eps[1:])
    out = torch.cat([torch.cat([guided, guided]), rest], dim=1)
    x0 = diffusion.predict_x0(x, i, out[:, :1])
    images = (x0 + 1) / 2  # the identity codec's decode
    total = 0
    for params, target in zip(loss.checkpoints, loss.targets):
        for image in images:
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            ce = F.cross_entropy(functional_call(loss.model, leaves, (image[None],)), torch.tensor([label]))
            grads = torch.autograd.grad(ce, list(leaves.values()), create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            total = total + 1 - F.cosine_similarity(flat, target[label], dim=0)
    g = torch.autograd.grad(total / len(loss.checkpoints), x)[0][:1]
    rms = lambda v: v.pow(2).mean().sqrt()
    abar = diffusion.alphas_cumprod[i]
    rho = (1 - abar).sqrt() * RHO * rms(guided[0]) / rms(g)
    return -K * rho * g


def guidance(loss, decode_rows, window=(0, STEPS - 1)):
    return InfluenceGuidance(codec=IdentityCodec(1), loss=loss, alphas_cumprod=Diffusion(STEPS).alphas_cumprod,
                             k=K, rho_scale=RHO, window=window, deviation=Deviation(ClassMemory(1), 0.0),
                             decode_rows=decode_rows)


@pytest.mark.parametrize("reference", [False, True])
def test_both_rows_step_equals_the_official_influence_step(reference):
    dit, loss = tiny_dit(), influence_setup(torch.float32)
    sampler = Sampler(dit, SamplerSettings(STEPS, CFG), SHAPE)
    g = torch.Generator().manual_seed(1)
    x_cond, x_null = torch.randn(1, *SHAPE, generator=g), torch.randn(1, *SHAPE, generator=g)
    label, i = 2, 3
    both = guidance(loss, "both")
    both.reference = reference
    null = NullRow(x_null.clone(), NoiseStream([7]))
    with torch.no_grad():
        guided, _ = sampler.step(x_cond, i, torch.tensor([label]), NoiseStream([5]), both, None, null)
        plain, _ = sampler.step(x_cond, i, torch.tensor([label]), NoiseStream([5]))
    want = official_correction(dit, loss, x_cond, x_null, i, label)
    got = guided - plain  # the correction, up to the float32 rounding of x_{t-1} (~1e-7)
    assert want.abs().max() > 1e-5
    assert (got - want).abs().max() <= 1e-3 * want.abs().max() + 3e-7
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999
    # the null row took its own step: the posterior mean from the guided eps plus its own noise
    assert not torch.equal(null.x, x_null) and not torch.equal(null.x, plain)


def test_null_rows_change_only_what_guidance_sees():
    """Unguided, the null rows change nothing; guided, both-rows differs from conditional-only
    (the correction turns), and the null rows start as the sample and diverge by their own noise."""
    dit, loss = tiny_dit(), influence_setup(torch.float32)
    sampler = Sampler(dit, SamplerSettings(STEPS, CFG), SHAPE)
    labels = torch.tensor([0, 2])
    run = lambda guide: sampler.sample(labels, NoiseStream([11, 12]), guide)
    with torch.no_grad():
        unguided = run(None)
        never = run(guidance(loss, "both", window=(STEPS, STEPS)))  # a window no step reaches
        cond = run(guidance(loss, "conditional"))
        both = run(guidance(loss, "both"))
    torch.testing.assert_close(never, unguided, rtol=0, atol=0)
    assert (both - cond).abs().max() > 1e-6 and (cond - unguided).abs().max() > 1e-6
    d_cond, d_both = (cond - unguided).flatten(1), (both - unguided).flatten(1)
    assert (F.cosine_similarity(d_cond, d_both, dim=1) > 0).all()  # the same direction, turned


def test_official_surrogate_protocol_trains_and_guides_as_the_official_code(tiny_models, tmp_path, monkeypatch):
    """igd.surrogate_protocol=official: the `augmented` recipe at data.image_size (not the
    classifiers' size), ImageNet-normalised in training, [-1, 1] inputs (0.5/0.5) in guidance;
    the default keeps igd.surrogate's recipe, the classifier size and the training statistics."""
    from lgd import classifier_cache
    from lgd.guidance import ClassMemory
    from lgd.config import load_config
    from lgd.pipeline import Distiller
    from tests.helpers import tiny_overrides

    trained = []
    train = classifier_cache.train_classifier

    def spy(model, data, section, **kwargs):
        trained.append((section.recipe, model.image_size, model.mean.flatten().tolist()))
        return train(model, data, section, **kwargs)

    monkeypatch.setattr(classifier_cache, "train_classifier", spy)
    seen = {}
    for protocol in ("lgd", "official"):
        overrides = tiny_overrides(tiny_models, **{"data.classifier_size": 6, "igd.surrogate_protocol": protocol})
        distiller = Distiller(load_config("demo", overrides), tmp_path / protocol, progress=False)
        try:
            distiller.prepare()
            loss = distiller.influence_loss()
            guidance = distiller.guidance("igd", ClassMemory(1))([0])
            assert guidance.loss is loss
            seen[protocol] = (loss.model.image_size, loss.model.mean.flatten().tolist(), loss.model.std.flatten().tolist())
        finally:
            distiller.close()
    (lgd_recipe, lgd_size, lgd_mean), (official_recipe, official_size, official_mean) = trained
    assert (lgd_recipe, lgd_size, official_recipe, official_size) == ("plain", 6, "augmented", 8)
    assert lgd_mean == official_mean == [0.5]  # 1-channel data trains on 0.5/0.5 either way
    assert seen["lgd"][0] == 6 and seen["official"] == (8, [0.5], [0.5])


def test_augmented_recipe_is_the_hard_label_augmentation_without_cutmix():
    from lgd.training.recipes import augmenter, lr_milestones
    from lgd.training.augment import hard_label_augment

    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    model = torch.nn.Identity()
    images, targets = augmenter("augmented", model, torch.Generator().manual_seed(3))(x, y)
    assert len(targets) == 1 and torch.equal(targets[0], y)  # no CutMix partner
    torch.testing.assert_close(images, hard_label_augment(x, 16, torch.Generator().manual_seed(3)))
    assert not torch.equal(images, x)
    assert lr_milestones("augmented", 50) == ([], 1.0)  # constant LR


def test_rows_cosine_script_measures_every_guided_step(tiny_models):
    from tests.helpers import benchmark_module, tiny_overrides

    igd_rows = benchmark_module("igd_rows")
    result = igd_rows.measure("demo", tiny_overrides(tiny_models), classes=3)
    assert result["guided_steps"] == 3 and result["samples"] == 3  # igd.window [2, 4] of 6 steps
    c = result["cosine"]
    assert -1 <= c["min"] <= c["median"] <= c["max"] <= 1 and c["min"] < 0.99999  # the null row does turn it
