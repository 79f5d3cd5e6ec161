"""Classifier registry, shapes, input normalisation, double backward and torch.func."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lgd.classifiers import CLASSIFIERS, build_classifier, canonical_name
from lgd.errors import ConfigError


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_registry_default_width(name):
    model = build_classifier(name, 3, 10, 32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64)])
def test_registry_output_shape(name, channels, size):
    # the feature size follows the input size, not the width: a narrow net keeps this fast
    model = build_classifier(name, channels, 7, size, width=8)
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet_ap10", "resnet18"])
@pytest.mark.parametrize("size", [96, 160])  # the mid (65..128 px) and large (> 128 px) stems
def test_resnet_stems_for_larger_images(name, size):
    model = build_classifier(name, 3, 5, size, width=4)
    assert model(torch.rand(1, 3, size, size)).shape == (1, 5)


@pytest.mark.parametrize(
    "alias,canonical",
    [("ConvNet-6", "convnet6"), ("convnet3", "convnet3"), ("ResNetAP-10", "resnet_ap10"),
     ("resnet_ap10", "resnet_ap10"), ("ResNet-18", "resnet18"), ("RESNET18", "resnet18")],
)
def test_aliases(alias, canonical):
    assert canonical_name(alias) == canonical


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_classifier("vgg11", 3, 10, 32)
    for name in CLASSIFIERS:
        assert name in str(err.value)


def test_normalisation_inside_the_model():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    model = build_classifier("convnet3", 3, 10, 8, mean=mean, std=std, width=4)
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.prepare(x), expected)
    assert "mean" in model.state_dict()  # checkpoints carry their normalisation
    with pytest.raises(ConfigError):
        build_classifier("convnet3", 3, 10, 8, mean=(0.5, 0.5))
    with pytest.raises(ConfigError):
        build_classifier("convnet3", 1, 10, 8, std=0.0)


def _double_backward_check(model: torch.nn.Module, x: torch.Tensor, param_names: list[str]):
    """Second derivatives w.r.t. the input and some parameters (one of each layer kind)
    against finite differences: the mixed d/dx (dL/dtheta) is what influence guidance
    backpropagates. fast_mode compares random projections of the second-derivative matrix;
    its cost grows with the number of input tensors, hence a parameter subset."""
    model = model.double()
    fixed = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()] if k not in param_names}
    chosen = dict(model.named_parameters())

    def fn(inp, *params):
        return functional_call(model, {**fixed, **dict(zip(param_names, params))}, (inp,))

    params = [chosen[k].detach().clone().requires_grad_() for k in param_names]
    assert torch.autograd.gradgradcheck(fn, (x.double().requires_grad_(), *params), fast_mode=True)


def test_gradgradcheck_convnet3():
    model = build_classifier("convnet3", 2, 3, 8, width=4)  # 8 px: the last block keeps 2x2 (no pool)
    names = ["features.0.weight", "features.1.weight", "features.5.bias", "classifier.weight"]
    _double_backward_check(model, torch.rand(2, 2, 8, 8), names)


def test_gradgradcheck_resnet_ap10():
    model = build_classifier("resnet_ap10", 2, 3, 16, width=2)
    names = ["stem.0.weight", "stem.1.weight", "stages.1.conv1.weight", "stages.1.shortcut.2.bias", "fc.weight"]
    _double_backward_check(model, torch.rand(2, 2, 16, 16), names)


def test_vmap_per_sample_gradients_match_loop():
    torch.manual_seed(0)
    model = build_classifier("convnet3", 1, 4, 12, width=8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = torch.rand(5, 1, 12, 12), torch.randint(0, 4, (5,))

    def loss(p, xi, yi):
        logits = functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(batched[k][i], p.grad, rtol=1e-4, atol=1e-6)


def test_training_guidance_and_scoring_see_the_same_input():
    """The classifier owns its input: a 12 px image reaches the first layer of a 8 px classifier
    identically when the stage model is trained on it, guided with it and scores it."""
    from lgd.config import TrainSection
    from lgd.diffusion import Diffusion
    from lgd.guidance import ClassMemory, Deviation, LearnabilityGuidance, learnability
    from lgd.models.vae import IdentityCodec
    from lgd.training import train_classifier

    torch.manual_seed(0)
    student, reference = (build_classifier("convnet3", 1, 3, 8, width=4) for _ in range(2))
    image, label = torch.randint(0, 256, (1, 1, 12, 12)) / 256, torch.tensor([2])  # exact through the codec
    seen = []
    student.features[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))

    train_classifier(student, (image, label), TrainSection(recipe="plain", epochs=1, batch_size=1), progress=False)
    trained = seen[-1]
    student.requires_grad_(False)
    codec = IdentityCodec(1)
    x_t = codec.encode(image).requires_grad_(True)
    guidance = LearnabilityGuidance(
        codec=codec, student=student, reference=reference,
        alphas_cumprod=Diffusion(num_sampling_steps=10).alphas_cumprod, omega=0.5, lam=1.0, rho_scale=1.0,
        window=(0, 9), deviation=Deviation(ClassMemory(1), 0.0))
    with torch.enable_grad():
        guidance.gradient(x_t, x_t * 1.0, label)
    guided = seen[-1]
    with torch.no_grad():
        learnability(student, reference, image, label, 0.5)
    scored = seen[-1]
    assert trained.shape == (1, 1, 8, 8)
    assert torch.equal(trained, guided) and torch.equal(guided, scored)
    # the one resize: antialiased bilinear, then the classifier's statistics
    expected = (F.interpolate(image, size=(8, 8), mode="bilinear", antialias=True) - 0.5) / 0.5
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
