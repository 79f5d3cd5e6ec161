"""Speed switches (lgd/acceleration.py): compiled and autocast paths against the plain fp32 path.

Compile cost dominates here (30-130 s per graph cold on the shared 2-core machine, ~5 s warm),
so the default tests share one compiled DiT and one compiled VAE, called with exactly the
shapes, dtypes and grad modes of the guided sampling run, which then reuses their three graphs
(DiT CFG with and without grad, decoder with grad). Other shapes and graphs are slow tests.
"""
import copy
import json

import pytest
import torch
import torch._dynamo

from lgd.acceleration import PRECISIONS, apply_speedups, resolve_precision, tf32
from lgd.classifiers import build_classifier
from lgd.config import load_config
from lgd.errors import ConfigError
from lgd.guidance import ClassMemory, Deviation, InfluenceGuidance, InfluenceLoss, LearnabilityGuidance
from lgd.guidance.influence import class_mean_gradients
from lgd.models.dit import DiT
from lgd.models.vae import IdentityCodec, LatentCodec
from lgd.diffusion.sampler import Sampler, SamplerSettings
from lgd.seeding import NoiseStream
from tests import helpers
from tests.helpers import tiny_dit_file, tiny_vae_folder

CLASSES, BATCH, CFG, STEPS = 3, 2, 4.0, 4
LATENT = (4, 4, 4)  # tiny VAE: 4-channel latents, 2x downsampling -> 8x8 RGB images


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    """Start and end with empty dynamo caches; hitting the recompile limit must fail loudly
    (dynamo would otherwise fall back to eager, and compiled-vs-eager checks would pass vacuously)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def tiny_dit(seed: int = 0) -> DiT:
    """The DiT's own initialisation, the zero-initialised adaLN-Zero/output layers made small
    random, so the output depends on every input and sampling stays in range."""
    return helpers.tiny_dit(seed, input_size=LATENT[1], num_classes=CLASSES).eval().requires_grad_(False)


def tiny_codec(seed: int = 0) -> LatentCodec:
    return LatentCodec(helpers.tiny_vae(3, seed=seed, sample_size=8)).eval()


def tiny_classifier(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_classifier("convnet3", 3, CLASSES, 8, width=4).eval().requires_grad_(False)


def step_inputs(seed: int = 2):
    """What the Sampler feeds the DiT: fp32 latents, one timestep expanded over the batch, labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *LATENT, generator=gen)
    t = torch.tensor(333).expand(BATCH)
    y = torch.tensor([0, CLASSES - 1])
    return x, t, y


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def input_grad(fn, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """d <w, fn(x)> / dx for a fixed random w (a generic first-order vector-Jacobian product)."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        out = fn(x)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (grad,) = torch.autograd.grad((out.float() * w).sum(), x)
    return grad


def flash_rule(fast: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, atol: float = 1e-5) -> None:
    """|fast - ref_fp32| <= 2 |ref_lowp - ref_fp32| + atol: the fast path may err at most twice
    as much as plain PyTorch does when the whole model runs in the low precision."""
    fast_err = (fast - ref_fp32).abs().max().item()
    plain_err = (ref_lowp.float() - ref_fp32).abs().max().item()
    assert fast_err <= 2 * plain_err + atol, f"fast error {fast_err:.3e} > 2 x plain low-precision error {plain_err:.3e}"


# ---------------------------------------------------------------------------------------------
# Switches


def test_switches_off_mean_no_compile_and_no_wrapping(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.compile called with compile=False")

    monkeypatch.setattr(torch, "compile", forbidden)
    for precision in ("fp32", "auto"):  # auto is fp32 on CPU
        dit, codec = tiny_dit(), tiny_codec()
        assert apply_speedups(dit, codec, compile=False, precision=precision) == torch.float32
        assert dit.forward.__func__ is DiT.forward and dit.forward_with_cfg.__func__ is DiT.forward_with_cfg
        assert not {"forward", "forward_with_cfg"} & set(vars(dit))
        assert codec.decode.__func__ is LatentCodec.decode and codec.encode.__func__ is LatentCodec.encode
        assert "forward" not in vars(codec.vae.decoder)


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == torch.float32
    assert [resolve_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16,
                                                                                 torch.float16]
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("capability,auto", [((7, 0), torch.float32), ((7, 5), torch.float32),
                                             ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, auto):
    """A V100 (7.0) or T4 (7.5) emulates bf16 (is_bf16_supported says yes): auto stays fp32 there,
    and an explicit bf16 is refused with the reason."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == auto
    if auto == torch.float32:
        with pytest.raises(ConfigError, match=f"compute capability {capability[0]}.{capability[1]}.*no native bf16"):
            resolve_precision("bf16", "cuda")
    else:
        assert resolve_precision("bf16", "cuda") == torch.bfloat16


def test_tf32_switch_sets_both_backends_and_restores_them():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for enabled in (True, False):
        with tf32(enabled):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (enabled, enabled)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_low_precision_wraps_calls_keeps_fp32_weights_and_outputs_and_applies_once():
    dit, codec = tiny_dit(), tiny_codec()
    keys = list(dit.state_dict())
    assert apply_speedups(dit, codec, precision="bf16") == torch.bfloat16
    assert {"forward", "forward_with_cfg"} <= set(vars(dit)) and "decode" in vars(codec)
    assert list(dit.state_dict()) == keys
    assert all(p.dtype == torch.float32 for p in [*dit.parameters(), *codec.parameters()])
    x, t, y = step_inputs()
    with torch.no_grad():
        assert dit.forward_with_cfg(x, t, y, CFG).dtype == torch.float32
        assert dit(x, t, y).dtype == torch.float32
        assert codec.decode(x).dtype == torch.float32
        assert codec.encode(torch.rand(BATCH, 3, 8, 8)).dtype == torch.float32
    with pytest.raises(ConfigError, match="already applied"):
        apply_speedups(dit, codec, precision="bf16")
    with pytest.raises(ConfigError, match="xformers"):
        apply_speedups(tiny_dit().set_attention_backend("xformers"), compile=True, precision="fp32")
    identity = IdentityCodec(4)  # nothing to accelerate: left alone
    apply_speedups(tiny_dit(), identity, precision="bf16")
    assert not vars(identity).get("decode")


def test_fp32_guidance_keeps_differentiated_calls_in_fp32_and_the_rest_in_low_precision():
    plain_dit, plain_codec = tiny_dit(), tiny_codec()
    low_dit, low_codec = tiny_dit(), tiny_codec()
    mixed_dit, mixed_codec = tiny_dit(), tiny_codec()
    apply_speedups(low_dit, low_codec, precision="bf16")
    apply_speedups(mixed_dit, mixed_codec, precision="bf16", fp32_guidance=True)
    x, t, y = step_inputs()
    z = x[:, :, :4, :4]

    def dit_cfg(dit):
        return lambda x: dit.forward_with_cfg(x, t, y, CFG)

    exact = dict(rtol=0, atol=0)
    # With grad (a guided step): the fp32 computation itself, values and input gradients.
    torch.testing.assert_close(input_grad(dit_cfg(mixed_dit), x), input_grad(dit_cfg(plain_dit), x), **exact)
    torch.testing.assert_close(input_grad(mixed_codec.decode, z), input_grad(plain_codec.decode, z), **exact)
    with torch.enable_grad():
        torch.testing.assert_close(mixed_dit.forward_with_cfg(x, t, y, CFG), plain_dit.forward_with_cfg(x, t, y, CFG),
                                   **exact)
    # Without grad (unguided steps, final decodes): the low precision, as without the option.
    with torch.no_grad():
        mixed, low, plain = (d.forward_with_cfg(x, t, y, CFG) for d in (mixed_dit, low_dit, plain_dit))
        torch.testing.assert_close(mixed, low, **exact)
        assert (mixed - plain).abs().max() > 1e-4
        torch.testing.assert_close(mixed_codec.decode(z), low_codec.decode(z), **exact)


# ---------------------------------------------------------------------------------------------
# torch.compile against eager (fp32: tight)


@pytest.fixture(scope="module")
def compiled():
    """(eager, compiled) copies of one tiny DiT and one tiny VAE codec."""
    dit, codec = tiny_dit(), tiny_codec()
    fast_dit, fast_codec = copy.deepcopy(dit), copy.deepcopy(codec)
    apply_speedups(fast_dit, fast_codec, compile=True, precision="fp32")
    return dit, codec, fast_dit, fast_codec


def test_compile_on_cpu_uses_plain_attention(compiled):
    """Inductor fuses the plain attention; the DiT and the VAE leave PyTorch's CPU SDPA kernel."""
    dit, codec, fast_dit, fast_codec = compiled
    assert dit.attention_backend == "sdpa" and fast_dit.attention_backend == "math"
    processors = {type(p).__name__ for p in fast_codec.vae.attn_processors.values()}
    assert processors == {"AttnProcessor"}, processors
    assert {type(p).__name__ for p in codec.vae.attn_processors.values()} != {"AttnProcessor"}


@pytest.mark.slow
def test_compiled_dit_cfg_forward_and_input_gradient_match_eager(compiled):
    dit, _, fast, _ = compiled
    x, t, y = step_inputs()
    with torch.no_grad():  # the unguided step: inference graph
        expected, actual = dit.forward_with_cfg(x, t, y, CFG), fast.forward_with_cfg(x, t, y, CFG)
    assert rel_err(actual, expected) <= 1e-5
    # the guided step: x_t requires grad
    expected = input_grad(lambda v: dit.forward_with_cfg(v, t, y, CFG), x)
    actual = input_grad(lambda v: fast.forward_with_cfg(v, t, y, CFG), x)
    assert rel_err(actual, expected) <= 1e-5


@pytest.mark.slow
def test_compiled_vae_decode_input_gradient_matches_eager(compiled):
    """The guided step's decode. Regression test: with inductor's default layout optimisation
    this gradient came out all zero (see lgd/acceleration.py)."""
    _, codec, _, fast = compiled
    z = torch.randn(BATCH, *LATENT, generator=torch.Generator().manual_seed(4))
    assert rel_err(input_grad(fast.decode, z), input_grad(codec.decode, z)) <= 1e-5


@pytest.mark.slow
def test_compiled_vae_decode_forward_matches_eager(compiled):
    """The final (no-grad) decode: one more compiled graph."""
    _, codec, _, fast = compiled
    z = torch.randn(BATCH, *LATENT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(fast.decode(z), codec.decode(z)) <= 1e-5


def memory_of_every_class() -> ClassMemory:
    memory = ClassMemory(4)
    for c in range(CLASSES):
        memory.add(c, torch.randn(LATENT, generator=torch.Generator().manual_seed(10 + c)))
    return memory


def guided_final(dit: DiT, make_guidance) -> torch.Tensor:
    """Final latents of STEPS-step sampling of step_inputs' labels, fixed seeds, with the guidance
    make_guidance(alphas_cumprod) builds; no candidate may fail."""
    sampler = Sampler(dit, SamplerSettings(steps=STEPS, cfg_scale=CFG), LATENT)
    guidance = make_guidance(sampler.diffusion.alphas_cumprod)
    with torch.no_grad():
        final = sampler.sample(step_inputs()[2], NoiseStream([5, 6]), guidance)
    assert not guidance.nonfinite.pop_failed()
    return final


def test_guided_sampling_compile_on_and_off_agree(compiled):
    """LGD guidance through DiT (CFG) and VAE decode, 4 steps of which 2 guided, same seeds."""
    dit, codec, fast_dit, fast_codec = compiled
    student, reference = tiny_classifier(1), tiny_classifier(2)
    memory = memory_of_every_class()
    eager, fast = (guided_final(model, lambda alphas, vae=vae: LearnabilityGuidance(
        codec=vae, student=student, reference=reference, alphas_cumprod=alphas,
        omega=0.5, lam=15.0, rho_scale=0.05, window=(1, 2), deviation=Deviation(memory, 1.0)))
        for model, vae in ((dit, codec), (fast_dit, fast_codec)))
    assert rel_err(fast, eager) <= 1e-4, rel_err(fast, eager)


@pytest.mark.slow
@pytest.mark.parametrize("batch, cfg_channels", [(1, None), (3, 3), (5, None)])
def test_compiled_dit_other_shapes_with_and_without_cfg(batch, cfg_channels):
    dit = tiny_dit(seed=batch)
    fast = copy.deepcopy(dit)
    apply_speedups(fast, compile=True, precision="fp32")
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *LATENT, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen).float()
    y = torch.randint(0, CLASSES + 1, (batch,), generator=gen)  # includes the null class
    calls = [lambda m: (lambda v: m(v, t, y)), lambda m: (lambda v: m.forward_with_cfg(v, t, y, 1.5, cfg_channels))]
    for call in calls:
        with torch.no_grad():
            assert rel_err(call(fast)(x), call(dit)(x)) <= 1e-5
        assert rel_err(input_grad(call(fast), x), input_grad(call(dit), x)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Mixed precision against fp32, by the flash-attention rule


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_dit_output_and_gradient_within_twice_plain_low_precision_error(precision, dtype):
    dit = tiny_dit()
    fast, lowp = copy.deepcopy(dit), copy.deepcopy(dit).to(dtype)
    apply_speedups(fast, precision=precision)
    x, t, y = step_inputs()
    calls = {m: (lambda v, m=m: m.forward_with_cfg(v, t, y, CFG)) for m in (dit, fast, lowp)}
    with torch.no_grad():
        flash_rule(calls[fast](x), calls[dit](x), calls[lowp](x.to(dtype)))
    flash_rule(input_grad(calls[fast], x), input_grad(calls[dit], x), input_grad(calls[lowp], x.to(dtype)))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_vae_decode_and_gradient_within_twice_plain_low_precision_error(precision, dtype):
    codec = tiny_codec()
    fast, lowp = copy.deepcopy(codec), copy.deepcopy(codec).to(dtype)
    apply_speedups(tiny_dit(), fast, precision=precision)
    z = torch.randn(BATCH, *LATENT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        flash_rule(fast.decode(z), codec.decode(z), lowp.decode(z.to(dtype)))
    flash_rule(input_grad(fast.decode, z), input_grad(codec.decode, z), input_grad(lowp.decode, z.to(dtype)))


@pytest.mark.slow
def test_compiled_bf16_dit_within_twice_plain_bf16_error():
    torch._dynamo.reset()  # the module's earlier tests used up DiT.forward's recompile budget
    dit = tiny_dit(seed=7)
    fast, lowp = copy.deepcopy(dit), copy.deepcopy(dit).to(torch.bfloat16)
    apply_speedups(fast, compile=True, precision="bf16")
    x, t, y = step_inputs()
    with torch.no_grad():
        flash_rule(fast.forward_with_cfg(x, t, y, CFG), dit.forward_with_cfg(x, t, y, CFG),
                   lowp.forward_with_cfg(x.bfloat16(), t, y, CFG))


def influence_loss(compile: bool = False) -> InfluenceLoss:
    model = tiny_classifier(0)
    checkpoints = []
    for e in range(2):
        gen = torch.Generator().manual_seed(10 + e)
        checkpoints.append({k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in model.named_parameters()})
    real = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    real_labels = torch.arange(12) % CLASSES
    targets = torch.stack([class_mean_gradients(model, p, real, real_labels, CLASSES) for p in checkpoints])
    return InfluenceLoss(model, checkpoints, targets, compile=compile)


@pytest.fixture(scope="module")
def compiled_influence() -> tuple[InfluenceLoss, InfluenceLoss]:
    """(eager, compiled) influence losses over the same surrogate checkpoints and targets."""
    eager = influence_loss()
    return eager, InfluenceLoss(eager.model, eager.checkpoints, eager.targets, compile=True)


def check_compiled_influence_gradient(eager: InfluenceLoss, fast: InfluenceLoss, batch: int) -> None:
    images = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch), requires_grad=True)
    labels = torch.arange(batch) % CLASSES
    (expected,) = torch.autograd.grad(eager.batched(images, labels).sum(), images)
    assert expected.abs().max() > 0
    assert rel_err(fast.input_gradient(images, labels), expected) <= 1e-5


@pytest.mark.slow
def test_compiled_influence_gradient_matches_eager(compiled_influence):
    """IGD's double-backward region compiled whole (torch.compile of the torch.func gradient):
    the same gradient w.r.t. the images as autograd's eager double backward, at the guided
    run's batch (the IGD sampling test below reuses this graph)."""
    check_compiled_influence_gradient(*compiled_influence, BATCH)


@pytest.mark.slow
def test_compiled_influence_gradient_at_a_second_batch_size(compiled_influence):
    """A new batch size compiles a second graph, which must match eager too."""
    check_compiled_influence_gradient(*compiled_influence, BATCH + 1)


@pytest.mark.slow
def test_igd_guided_sampling_compile_on_and_off_agree(compiled, compiled_influence):
    """IGD guidance through DiT (CFG) and VAE decode, the compiled influence gradient chained to
    x_t by one backward, against the all-eager autograd double backward; 4 steps, 2 guided."""
    dit, codec, fast_dit, fast_codec = compiled
    memory = memory_of_every_class()
    eager, fast = (guided_final(model, lambda alphas, vae=vae, loss=loss: InfluenceGuidance(
        codec=vae, loss=loss, alphas_cumprod=alphas, k=5.0, rho_scale=0.05, window=(1, 2),
        deviation=Deviation(memory, 1.0)))
        for model, vae, loss in ((dit, codec, compiled_influence[0]), (fast_dit, fast_codec, compiled_influence[1])))
    assert rel_err(fast, eager) <= 1e-4, rel_err(fast, eager)


def test_igd_double_backward_under_fp16_runs_outside_autocast_finite_and_equal_to_fp32():
    """IGD's classifier double backward sees fp32 images with autocast off, so fp16 (with a
    double autograd.grad: the NaN trap of docs/measured-facts.md) never reaches it; only the DiT/VAE
    first-order parts run in fp16."""
    dit, codec, loss = tiny_dit(), tiny_codec(), influence_loss()
    seen = []
    batched = loss.batched

    def spy(images, labels):
        seen.append((torch.is_autocast_enabled("cpu"), images.dtype))
        return batched(images, labels)

    loss.batched = spy
    x, _, labels = step_inputs()
    i = 2
    grads = {}
    for precision in ("fp32", "fp16"):
        model, vae = copy.deepcopy(dit), copy.deepcopy(codec)
        apply_speedups(model, vae, precision=precision)
        sampler = Sampler(model, SamplerSettings(steps=STEPS, cfg_scale=CFG), LATENT)
        guidance = InfluenceGuidance(
            codec=vae, loss=loss, alphas_cumprod=sampler.diffusion.alphas_cumprod, k=5.0, rho_scale=0.0015,
            window=(0, STEPS - 1), deviation=Deviation(ClassMemory(1), 0.0))
        with torch.enable_grad():
            x_t = x.clone().requires_grad_(True)
            out = sampler.model_output(x_t, i, labels)
            assert out.dtype == torch.float32  # the DDPM step sees fp32
            _, x0_hat = sampler.diffusion.ddpm_step(out, x_t, i, noise=torch.zeros_like(x))
            grads[precision] = guidance.gradient(x_t, x0_hat, labels)
    assert seen == [(False, torch.float32)] * 2
    assert torch.isfinite(grads["fp16"]).all()
    # fp16 only touches the first-order DiT/VAE parts (measured 2.7e-3 at this mid-noise step;
    # at t = 999 x0_hat amplifies the eps error ~160x and it reaches 4e-2)
    assert rel_err(grads["fp16"], grads["fp32"]) <= 2e-2, rel_err(grads["fp16"], grads["fp32"])


# ---------------------------------------------------------------------------------------------
# Config, pipeline and CLI wiring


def test_config_fields_defaults_values_and_messages():
    assert (load_config("demo").sampling.compile, load_config("demo").sampling.precision) == (False, "auto")
    assert load_config("demo").sampling.fp32_guidance is False
    assert load_config("demo", ["sampling.fp32_guidance=true"]).sampling.fp32_guidance is True
    config = load_config("demo", ["sampling.compile=true", "sampling.precision=fp16"])
    assert (config.sampling.compile, config.sampling.precision) == (True, "fp16")
    for precision in PRECISIONS:
        load_config("demo", [f"sampling.precision={precision}"])
    with pytest.raises(ConfigError, match="sampling.compile must be bool"):
        load_config("demo", ["sampling.compile=1"])
    with pytest.raises(ConfigError, match="sampling.engine=reference is plain eager fp32"):
        load_config("demo", ["sampling.engine=reference", "sampling.compile=true"])
    with pytest.raises(ConfigError, match="sampling.precision=bf16"):
        load_config("demo", ["sampling.engine=reference", "sampling.precision=bf16"])


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_dit_file(root / "dit.safetensors"), tiny_vae_folder(root / "vae")


def test_load_generator_applies_the_switches_to_the_fast_engine_only(model_files):
    from lgd.pipeline import load_generator

    dit, vae = model_files
    base = [f"model.dit={dit}", f"model.vae={vae}", "data.image_size=8", "sampling.steps=4", "lgd.window=[0, 3]",
            "igd.window=[0, 3]"]
    fast = load_generator(load_config("demo", base + ["sampling.precision=bf16"]), torch.device("cpu"))
    assert "forward_with_cfg" in vars(fast.dit) and "decode" in vars(fast.codec)
    assert fast.sampler.dit is fast.dit
    plain = load_generator(load_config("demo", base + ["sampling.engine=reference"]), torch.device("cpu"))
    assert "forward_with_cfg" not in vars(plain.dit) and "decode" not in vars(plain.codec)
    mixed = load_generator(load_config("demo", base + ["sampling.precision=bf16", "sampling.fp32_guidance=true"]),
                           torch.device("cpu"))
    x, t, y = step_inputs()
    with torch.enable_grad():  # a guided step: fp32, as the plain engine
        torch.testing.assert_close(mixed.dit.forward_with_cfg(x, t, y, CFG), plain.dit.forward_with_cfg(x, t, y, CFG),
                                   rtol=0, atol=0)


def test_sample_command_flags_reach_apply_speedups(model_files, tmp_path, monkeypatch):
    import lgd.sample
    from lgd.__main__ import main

    calls = []

    def record(dit, codec, *, compile, precision, fp32_guidance=False):
        calls.append((compile, precision))
        return apply_speedups(dit, codec, compile=False, precision=precision)  # no compile cost here

    monkeypatch.setattr(lgd.sample, "apply_speedups", record)
    dit, vae = model_files
    out = tmp_path / "s"
    args = ["sample", "--dit", str(dit), "--vae", str(vae), "--out", str(out), "--steps", "2", "--classes", "1"]
    assert main([*args, "--compile", "--precision", "bf16"]) == 0
    assert calls == [(True, "bf16")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["compile"], manifest["precision"]) == (True, "bfloat16")


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_checkpointed_decoder_gives_the_plain_gradient_and_images(compile):
    """sampling.checkpoint_decoder recomputes the decoder's blocks in backward: the same ops on
    the same inputs, so the input gradient and the decoded images are those without it."""
    from lgd.models.vae import checkpoint_decoder_blocks

    plain, checkpointed = tiny_codec(), tiny_codec()
    apply_speedups(tiny_dit(), plain, compile=compile)
    apply_speedups(tiny_dit(), checkpointed, compile=compile, checkpoint_decoder=True)
    z = torch.randn(BATCH, *LATENT, generator=torch.Generator().manual_seed(5))
    want, got = input_grad(plain.decode, z), input_grad(checkpointed.decode, z)
    assert got.abs().max() > 0
    if compile:
        assert rel_err(got, want) <= 1e-6
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(checkpointed.decode(z), plain.decode(z), rtol=1e-6, atol=1e-6)
    assert checkpoint_decoder_blocks(tiny_codec().vae.decoder) == 1 + 2  # the mid block and two up blocks
