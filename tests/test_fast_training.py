"""The fast training engine against the reference loop, and groups against lone trainings.

Tolerance: two fp32 trainings that differ only in float rounding drift apart as training
amplifies the rounding. The yardstick is the reference's own sensitivity: the reference run
again from initial weights perturbed by 1e-7 relative (fp32 rounding scale). The fast engine
reorders floats (micro-batch sums, fused update, inductor's kernels) but computes the same
thing, so its distance to the reference must stay within a small multiple of that drift.
"""
import copy
import dataclasses

import pytest
import torch

from lgd.classifiers import build_classifier
from lgd.config import TrainSection, load_config
from lgd.errors import ConfigError
from lgd.training import Member, accuracies, accuracy, train_classifier, train_classifiers
from lgd.training.fast import micro_batch, step_functions


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=24, size=16, channels=1, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(n // classes)
    x = 0.3 * torch.rand(n, channels, size, size, generator=g)
    for c in range(classes):  # a learnable signal: a bright quadrant per class
        x[y == c, :, (c // 2) * size // 2:(c // 2 + 1) * size // 2, (c % 2) * size // 2:(c % 2 + 1) * size // 2] += 0.6
    return x.clamp(0, 1), y


def net(name="convnet3", channels=1, size=16, seed=0, width=8):
    torch.manual_seed(seed)
    return build_classifier(name, channels, 4, size, width=width)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def perturbed(model, rel=1e-7, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=g))
    return out


def trained(model, train, section, **kw):
    model = copy.deepcopy(model)
    history = train_classifier(model, train, section, seed=5, progress=False, **kw)
    return model, history


def assert_same_training(fast, ref, drift, hf, hr, hs, factor=20):
    """fast within `factor` x the reference's own rounding drift (plus an fp32 floor), its
    parameters and its losses; hs: the history of the reference trained from the perturbed
    start (the loss drift grows with the epochs, and how fast depends on the CPU's kernels)."""
    err = (flat(fast) - flat(ref)).abs().max().item()
    bound = factor * drift + 1e-6 * flat(ref).abs().max().item()
    assert err <= bound, f"fast differs from reference by {err:.3g}, bound {bound:.3g} (drift {drift:.3g})"
    assert hf.lr == hr.lr
    loss_f, loss_r, loss_s = (torch.tensor(h.loss) for h in (hf, hr, hs))
    assert ((loss_f - loss_r).abs() <= factor * (loss_s - loss_r).abs() + 1e-3 * loss_r.abs() + 1e-5).all()


CASES = [  # (network, channels, size, recipe)
    ("convnet3", 1, 16, "dc"),
    ("convnet3", 3, 16, "hard_label"),
    ("convnet3", 1, 16, "plain"),
    ("convnet6", 1, 16, "dc"),
    ("resnet_ap10", 3, 32, "hard_label"),
    ("resnet_ap10", 1, 32, "plain"),
]


@pytest.mark.parametrize("network,channels,size,recipe", CASES)
def test_fast_engine_trains_the_reference_model(network, channels, size, recipe):
    train = data(size=size, channels=channels)
    section = TrainSection(network=network, recipe=recipe, epochs=4, batch_size=10, micro_batch=4)
    reference = dataclasses.replace(section, engine="reference")
    model = net(network, channels, size)
    ref, hr = trained(model, train, reference)
    shaken, hs = trained(perturbed(model), train, reference)
    drift = (flat(shaken) - flat(ref)).abs().max().item()
    fast, hf = trained(model, train, section)
    assert_same_training(fast, ref, drift, hf, hr, hs)
    assert not fast.training


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dc", "hard_label"])
def test_compiled_fast_engine_trains_the_reference_model(recipe):
    train = data(n=20, size=16, channels=3)
    section = TrainSection(network="convnet3", recipe=recipe, epochs=3, batch_size=8, compile=True)
    reference = dataclasses.replace(section, engine="reference", compile=False)
    model = net("convnet3", 3, 16)
    ref, hr = trained(model, train, reference)
    shaken, hs = trained(perturbed(model), train, reference)
    drift = (flat(shaken) - flat(ref)).abs().max().item()
    fast, hf = trained(model, train, section)
    assert_same_training(fast, ref, drift, hf, hr, hs)


def test_one_step_gradient_matches_autograd():
    """The functional gradient (micro-batched sum) equals loss.backward() on the batch mean."""
    import torch.nn.functional as F

    model = net("convnet3", 3, 16)
    x, y = data(n=12, size=16, channels=3)
    gradient, _ = step_functions(model, 0.9, 5e-4, compiled=False)
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    scale = torch.tensor(1 / 12)
    g1, l1 = gradient(params, buffers, x[:5], (y[:5],), scale)
    g2, l2 = gradient(params, buffers, x[5:], (y[5:],), scale)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.allclose(l1 + l2, loss.detach(), rtol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(g1[k] + g2[k], p.grad, rtol=1e-5, atol=1e-7)


def test_micro_batch_follows_the_cache_budget():
    model = net("convnet3", 1, 32, width=32)
    x = torch.rand(2, 1, 32, 32)
    assert micro_batch(model, x, None) == (4 << 20) // (4 * 32 * 32 * 32)  # the first conv's output
    assert micro_batch(model, x, 7) == 7


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_hooks_and_histories_match_the_reference(compiled):
    """on_epoch sees the current weights, eval and track curves are the reference's (compiled:
    scored by the compiled forward in micro-batches)."""
    train, test = data(), data(n=16, seed=9)
    section = TrainSection(network="convnet3", recipe="dc", epochs=3, batch_size=10, micro_batch=5, compile=compiled)
    model = net()
    runs = {}
    for engine in ("reference", "fast"):
        snaps = []
        m = copy.deepcopy(model)
        h = train_classifier(m, train, dataclasses.replace(section, engine=engine, compile=compiled and engine == "fast"),
                             seed=5, progress=False,
                             on_epoch=lambda e, mm: snaps.append(flat(mm).clone()), eval_data=test,
                             track=train, eval_every=2)
        runs[engine] = (snaps, h)
    (s_ref, h_ref), (s_fast, h_fast) = runs["reference"], runs["fast"]
    assert len(s_fast) == len(s_ref) == 4
    for a, b in zip(s_fast, s_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert h_fast.test_epochs == h_ref.test_epochs == [2, 3]
    assert h_fast.test_accuracy == h_ref.test_accuracy
    torch.testing.assert_close(h_fast.confidence, h_ref.confidence, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ groups


def group(seeds, stacking, models=None, datas=None, section=None, recipe="dc"):
    section = section or TrainSection(network="convnet3", recipe=recipe, epochs=3, batch_size=10, micro_batch=4,
                                      stacking=stacking)
    models = models or [net(seed=s) for s in seeds]
    datas = datas or [data(seed=s) for s in seeds]
    members = [Member(copy.deepcopy(m), d, seed) for m, d, seed in zip(models, datas, seeds)]
    histories = train_classifiers(members, section, progress=False)
    return [m.model for m in members], histories, models, datas, section


@pytest.mark.parametrize("recipe", ["dc", "hard_label"])
@pytest.mark.parametrize("stacking", ["loop", "vmap"])
def test_group_members_equal_lone_trainings(stacking, recipe):
    seeds = [1, 2, 3]
    trained_models, histories, models, datas, section = group(seeds, stacking, recipe=recipe)
    for model, history, init, d, seed in zip(trained_models, histories, models, datas, seeds):
        alone = copy.deepcopy(init)
        lone_history = train_classifier(alone, d, dataclasses.replace(section, stacking="loop"), seed=seed,
                                        progress=False)
        if stacking == "loop":
            assert torch.equal(flat(model), flat(alone))
        else:
            torch.testing.assert_close(flat(model), flat(alone), rtol=1e-4, atol=1e-6)
        assert history.loss == pytest.approx(lone_history.loss, rel=1e-5)


def test_compiled_groups_of_one_channel_models_agree_across_stackings():
    """The compiled member loop (one-input-channel convolutions on channels-last views) and the
    compiled vmap step (plain convolutions: vmap cannot restride) train the same models."""
    section = TrainSection(network="convnet3", recipe="dc", epochs=2, batch_size=10, micro_batch=4, compile=True)
    trained = {}
    for stacking in ("loop", "vmap"):
        trained[stacking], *_ = group([1, 2], stacking, section=dataclasses.replace(section, stacking=stacking))
    for a, b in zip(trained["loop"], trained["vmap"]):
        torch.testing.assert_close(flat(a), flat(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stacking", ["loop", "vmap"])
def test_group_members_do_not_leak(stacking):
    a, _, models, datas, section = group([1, 2, 3], stacking)
    b, *_ = group([1, 7, 3], stacking, models=models, datas=datas, section=section)
    assert torch.equal(flat(a[0]), flat(b[0])) and torch.equal(flat(a[2]), flat(b[2]))
    assert not torch.equal(flat(a[1]), flat(b[1]))


def test_group_refuses_mismatched_members():
    members = [Member(net(), data(n=24), 1), Member(net(), data(n=20), 2)]
    with pytest.raises(ConfigError, match="share the architecture"):
        train_classifiers(members, TrainSection(network="convnet3", recipe="dc", epochs=1), progress=False)


def test_accuracies_scores_every_model_in_one_pass():
    test = data(n=16, seed=4)
    models = [net(seed=s) for s in (1, 2)]
    assert accuracies(models, test) == pytest.approx([accuracy(m, test) for m in models])


def test_engine_fields_are_validated():
    with pytest.raises(ConfigError, match="engine must be fast or reference"):
        load_config("demo", ["eval.recipe.engine=turbo"])
    with pytest.raises(ConfigError, match="cannot be combined with compile"):
        load_config("demo", ["eval.recipe.engine=reference", "eval.recipe.compile=true"])
    with pytest.raises(ConfigError, match="stacking"):
        load_config("demo", ["lgd.stage_model.stacking=grouped"])
    assert load_config("demo", ["eval.recipe.engine=reference", "eval.recipe.compile=false"]).eval.recipe.engine == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k,shape", [(2, (3, 4, 8, 8)), (2, (2, 5, 7, 9)), (4, (2, 3, 16, 16))])
def test_mean_pool_matches_avg_pool(k, shape, dtype):
    """MeanPool (fast twin) against nn.AvgPool2d, forward and backward, by the flash rule:
    |fast - ref64| <= 2 |ref_dtype - ref64| + atol."""
    from lgd.training.fast import MeanPool

    x64 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = x64.detach().to(dtype).requires_grad_(True)
    g = torch.randn_like(nn_avg(k)(x64))
    outs = {}
    for name, pool, inp in (("ref64", nn_avg(k), x64), ("ref", nn_avg(k), x), ("fast", MeanPool(k), x)):
        inp.grad = None
        y = pool(inp)
        y.backward(g.to(y.dtype))
        outs[name] = (y.detach().double(), inp.grad.detach().double())
    atol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    for i in range(2):
        ref_err = (outs["ref"][i] - outs["ref64"][i]).abs().max()
        assert (outs["fast"][i] - outs["ref64"][i]).abs().max() <= 2 * ref_err + atol


def nn_avg(k):
    return torch.nn.AvgPool2d(k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,out,kernel,stride,padding,bias", [
    ((3, 1, 8, 8), 4, 3, 1, 1, True), ((2, 1, 7, 9), 5, 3, 2, 0, False), ((4, 1, 16, 16), 8, 5, 1, 2, True)])
def test_one_channel_conv_matches_conv2d(shape, out, kernel, stride, padding, bias, dtype):
    """OneChannelConv (fast twin) against nn.Conv2d, forward and backward (input and weight
    gradients), by the flash rule: |fast - ref64| <= 2 |ref_dtype - ref64| + atol; also on a
    non-contiguous input (a strided slice)."""
    from lgd.training.fast import OneChannelConv

    torch.manual_seed(sum(shape) + out)
    ref64 = torch.nn.Conv2d(1, out, kernel, stride, padding, bias=bias).double()
    ref, fast = copy.deepcopy(ref64).to(dtype), OneChannelConv.of(copy.deepcopy(ref64).to(dtype))
    base = torch.randn(shape[0], 1, shape[2], shape[3] * 2, dtype=torch.float64)
    for view in (slice(0, shape[3]), slice(None, None, 2)):  # the input's columns: contiguous, then strided
        g = torch.randn_like(ref64(base[..., view]))
        outs = {}
        for name, conv, dt in (("ref64", ref64, torch.float64), ("ref", ref, dtype), ("fast", fast, dtype)):
            full = base.to(dt, copy=True).requires_grad_(True)
            conv.zero_grad()
            y = conv(full[..., view] if view.step else full[..., view].contiguous())
            y.backward(g.to(y.dtype))
            outs[name] = [t.detach().double() for t in (y, full.grad[..., view], conv.weight.grad)]
        atol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
        for i in range(3):
            ref_err = (outs["ref"][i] - outs["ref64"][i]).abs().max()
            assert (outs["fast"][i] - outs["ref64"][i]).abs().max() <= 2 * ref_err + atol


@pytest.mark.parametrize("name,ch,fused_pools,mean_pools", [
    ("convnet3", 1, [2, 2, 2], 0), ("convnet6", 3, [2, 2, 2, 2, 1, 1], 0),
    ("resnet_ap10", 3, [1], 6), ("resnet18", 3, [1], 0), ("resnet_ap10", 1, [1], 6)])
def test_fast_twin_swaps_pools_one_channel_convolutions_and_norm_relu_pool_runs(name, ch, fused_pools, mean_pools):
    """Every plain AvgPool2d becomes MeanPool, unless it ends an instance norm -> ReLU -> pool
    run, which becomes one NormReLUPool (ConvNet's blocks; the ResNets' stems, without pool);
    the parameters keep their names and the outputs their values."""
    from lgd.kernels.norm_relu_pool import NormReLUPool
    from lgd.training.fast import MeanPool, OneChannelConv, fast_twin

    model = build_classifier(name, ch, 4, 32, width=8)
    twin = fast_twin(model)
    assert [m.pool for m in twin.modules() if isinstance(m, NormReLUPool)] == fused_pools
    assert sum(isinstance(m, MeanPool) for m in twin.modules()) == mean_pools
    one_channel = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 1]
    assert len(one_channel) == (1 if ch == 1 else 0)
    assert sum(isinstance(m, OneChannelConv) for m in twin.modules()) == len(one_channel)
    assert [k for k, _ in twin.named_parameters()] == [k for k, _ in model.named_parameters()]
    x = torch.rand(2, ch, 32, 32)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-6)
    stacked = fast_twin(model, stacked=True)  # vmap: the plain modules, only the pools swapped
    assert not any(isinstance(m, (NormReLUPool, OneChannelConv)) for m in stacked.modules())


def test_default_group_size_follows_free_memory():
    from lgd.training.fast import default_group_size, leaf_output_sizes

    cpu = torch.device("cpu")
    assert default_group_size(TrainSection(), cpu) == 1  # the member loop: one at a time
    assert default_group_size(TrainSection(engine="reference"), cpu) == 1
    vmap = TrainSection(network="convnet3", stacking="vmap")
    model, x = net("convnet3", 1, 32, width=32), torch.rand(1, 1, 32, 32)
    per_member = 16 * sum(p.numel() for p in model.parameters()) + 100 * 4 * sum(leaf_output_sizes(model, x))
    free = 40 * per_member  # half of it holds 20 members
    assert default_group_size(vmap, cpu, model, x, batch=100, free_bytes=free) == 20
    assert default_group_size(vmap, cpu, model, x, batch=100, free_bytes=1) == 1
    assert default_group_size(vmap, cpu, model, x, batch=100, free_bytes=10**15) == 64


def test_micro_batches_are_even_and_cover_the_batch():
    from lgd.training.fast import _chunks

    for n, size in ((100, 32), (90, 32), (7, 7), (5, 100), (64, 1)):
        parts = _chunks(n, size)
        lengths = [p.stop - p.start for p in parts]
        assert sum(lengths) == n and max(lengths) <= size and max(lengths) - min(lengths) <= 1
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert _chunks(10, None) == [slice(0, 10)]


def test_scoring_runs_whole_micro_batches():
    """A compiled forward sees one chunk shape over a test set (its last batch aside): batches
    of 256 in chunks of 25 would give chunks of 23 and 24, two graphs to compile."""
    from lgd.training.fast import _score, _State

    shapes = []

    def forward(params, buffers, x):
        shapes.append(len(x))
        return torch.zeros(len(x), 10)

    state = _State({}, {}, {})
    data = (torch.rand(1000, 1, 4, 4), torch.arange(1000) % 10)
    for chunk, expected in ((25, {25}), (20, {20}), (None, {256, 232})):
        shapes.clear()
        [accuracy] = _score(forward, lambda x: x, [state], data, torch.device("cpu"), chunk,
                            torch.contiguous_format, "accuracy")
        assert set(shapes) == expected and sum(shapes) == 1000
        assert float(accuracy) == pytest.approx(0.1)  # argmax of zeros is class 0, a tenth of the labels


def test_demo_trainings_share_one_compiled_step():
    """Every training of the demo preset -- the stage models, theta*, IGD's surrogate and the
    evaluation's, on the test and the validation split -- cuts its batches into micro-batches
    of one shape with one architecture and SGD rule, so distill compiles the step once and
    evaluate loads it from inductor's on-disk cache (lgd/configs/demo.yaml)."""
    from lgd.data import load_dataset
    from lgd.training.fast import _chunks
    from lgd.training.recipes import batch_size_of

    train = load_dataset("demo", "train")
    classes = len(set(train.labels.tolist()))

    def cut(n: int, size: int) -> list[int]:  # an epoch's batch sizes over n images
        return [min(size, n - start) for start in range(0, n, size)]

    for evaluate_on in ("test", "validation"):
        c = load_config("demo", [f"data.evaluate_on={evaluate_on}"])
        train_images = len(train) - (c.data.validation_per_class * classes if evaluate_on == "validation" else 0)
        stages = range(c.stages.increment, c.stages.ipc, c.stages.increment)
        batches = {  # section: the sizes of the batches it trains on
            "stage": [classes * ipc for ipc in stages],
            "reference": cut(train_images, c.lgd.reference_model.batch_size),
            "surrogate": cut(train_images, c.igd.surrogate.batch_size),
            "evaluation": [classes * c.stages.ipc],
        }
        sections = {"stage": c.lgd.stage_model, "reference": c.lgd.reference_model,
                    "surrogate": c.igd.surrogate, "evaluation": c.eval.recipe}
        for name, s in sections.items():  # the dc recipe's batch of 256 takes these sets whole
            assert s.recipe == "plain" or batch_size_of(s) >= max(batches[name])
        shapes = {p.stop - p.start for name, s in sections.items() for b in batches[name]
                  for p in _chunks(b, s.micro_batch)}
        assert shapes == {20}
        keys = {(s.network, s.width, s.compile, s.momentum, s.weight_decay, s.precision) for s in sections.values()}
        assert keys == {("convnet3", 32, True, 0.9, 5e-4, "auto")}


def test_canonical_layout_fixes_strides_without_changing_values():
    from lgd.training.fast import _canonical

    x = torch.rand(4, 1, 6, 6).contiguous(memory_format=torch.channels_last)  # "contiguous", odd strides
    y = _canonical(x, torch.contiguous_format)
    assert y.stride() == torch.empty(4, 1, 6, 6).stride() and torch.equal(x, y)
    z = torch.rand(4, 3, 6, 6)
    assert _canonical(z, torch.contiguous_format) is z
    assert _canonical(z, torch.channels_last).is_contiguous(memory_format=torch.channels_last)
