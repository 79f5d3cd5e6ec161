"""DiT model and checkpoint loading: equality with diffusers, CFG, attention backends, errors."""
import argparse
import copy
import logging
import math

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from tests.helpers import tiny_vae
from diffusers.models.embeddings import get_timestep_embedding

from lgd.errors import CheckpointError, ConfigError
from lgd.models import DIT_CONFIGS, DiT, DiTConfig, create_dit, infer_dit_config, load_dit, save_dit
from lgd.models.dit import timestep_embedding, xformers_usable

NUM_CLASSES = 10
# norm_eps=1e-6: the official DiT's MLP-side LayerNorm eps (diffusers' default is 1e-5).
TINY_DIFFUSERS = dict(
    num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
    patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    norm_eps=1e-6,
)


def _randomise(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter random, including the zero-initialised adaLN and final layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _tiny_dit(**overrides) -> DiT:
    return _randomise(create_dit("DiT-T/2", input_size=8, num_classes=NUM_CLASSES, **overrides))


def _inputs(batch: int = 3):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.tensor([0.0, 17.5, 999.0, 250.0][:batch])
    y = torch.tensor([0, NUM_CLASSES - 1, NUM_CLASSES, 3][:batch])  # includes the null class
    return x, t, y


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= rel, f"max relative error {err:.2e} > {rel:.0e}"


@pytest.fixture(scope="module")
def diffusers_ref():
    """A tiny diffusers DiT with random weights, set to the official DiT timestep convention."""
    torch.manual_seed(0)
    ref = _randomise(DiTTransformer2DModel(**TINY_DIFFUSERS))
    blocks = ref.transformer_blocks
    with torch.no_grad():  # real checkpoints hold identical embedder copies in every block
        for block in blocks[1:]:
            block.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    for block in blocks:  # diffusers default is 1 (frequencies / (half - 1)); official DiT is / half
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = _inputs()
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
    return ref, expected


def _tiny_vae() -> AutoencoderKL:
    return tiny_vae(blocks=(8,), seed=None)


def _write(fmt: str, ref: DiTTransformer2DModel, tmp_path):
    """Store the diffusers reference's weights in one of the supported formats; return the path."""
    if fmt == "diffusers":
        ref.save_pretrained(tmp_path / "transformer")
        return tmp_path / "transformer"
    if fmt == "pipeline":
        DiTPipeline(transformer=ref, vae=_tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
        return tmp_path / "pipe"
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_dit(tmp_path / "transformer")
    if fmt == "official":
        # Official training checkpoints: weights under "ema"/"model" next to argparse options.
        torch.save({"model": ours.state_dict(), "ema": ours.state_dict(), "args": argparse.Namespace(a=1)},
                   tmp_path / "ckpt.pt")
        return tmp_path / "ckpt.pt"
    save_dit(ours, tmp_path / "dit.safetensors")
    return tmp_path / "dit.safetensors"


@pytest.mark.parametrize("fmt", ["diffusers", "pipeline", "official", "ours"])
def test_matches_diffusers_in_every_format(fmt, diffusers_ref, tmp_path):
    ref, expected = diffusers_ref
    model = load_dit(_write(fmt, ref, tmp_path))
    assert not model.training
    assert model.config == DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                     num_heads=2, num_classes=NUM_CLASSES, learn_sigma=True)
    with torch.no_grad():
        out = model(*_inputs())
    assert out.shape == (3, 8, 8, 8)
    _assert_rel_close(out, expected)


@pytest.mark.parametrize("fmt", ["diffusers", "pipeline", "official", "ours"])
def test_the_config_reads_from_the_header_as_the_full_load_gives_it(fmt, diffusers_ref, tmp_path):
    """read_dit_config (safetensors headers, memory-mapped torch files, no weight data) gives the
    config load_dit builds from the full weights, in every format."""
    from lgd.models.loading import read_dit_config

    path = _write(fmt, diffusers_ref[0], tmp_path)
    assert read_dit_config(path) == load_dit(path).config


def test_timestep_embedding_is_official_convention():
    t = torch.tensor([0.0, 1.0, 999.5])
    half = 128
    args = t[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    official = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    torch.testing.assert_close(timestep_embedding(t), official)
    # diffusers' DiT embedder is the same formula only with downscale_freq_shift=0 (its default is 1).
    same = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t), same)
    assert not torch.allclose(get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1), official)


def test_diffusers_blocks_with_different_embedders_are_refused(diffusers_ref, tmp_path):
    ref = copy.deepcopy(diffusers_ref[0])
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    ref.save_pretrained(tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.norm1\.emb\.class_embedder"):
        load_dit(tmp_path / "bad")


@pytest.mark.parametrize("cfg_channels", [None, 3])
def test_forward_with_cfg_equals_two_passes(cfg_channels):
    model = _tiny_dit()
    x, t, y = _inputs()
    s, k = 4.0, 4 if cfg_channels is None else cfg_channels
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, NUM_CLASSES))
        out = model.forward_with_cfg(x, t, y, s, cfg_channels=cfg_channels)
    expected = cond.clone()
    expected[:, :k] = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError):
        model.forward_with_cfg(x, t, y, s, cfg_channels=5)


def test_sdpa_and_math_attention_agree_and_math_double_backward():
    model = _tiny_dit()
    x, t, y = _inputs()
    with torch.no_grad():
        sdpa = model(x, t, y)
        math_out = model.set_attention_backend("math")(x, t, y)
    torch.testing.assert_close(math_out, sdpa, rtol=1e-5, atol=1e-6)
    x = x.requires_grad_()
    (grad,) = torch.autograd.grad(model(x, t, y).square().sum(), x, create_graph=True)
    (grad2,) = torch.autograd.grad(grad.square().sum(), x)
    assert torch.isfinite(grad2).all() and grad2.abs().sum() > 0
    with pytest.raises(ConfigError, match="flash"):
        model.set_attention_backend("flash")


def test_xformers_request_falls_back_to_sdpa_with_one_warning(caplog):
    xformers_usable.cache_clear()
    if xformers_usable("cpu"):
        pytest.skip("xformers runs on this CPU")
    xformers_usable.cache_clear()
    caplog.clear()
    model = _tiny_dit()
    x, t, y = _inputs()
    with torch.no_grad():
        sdpa = model(x, t, y)
        model.set_attention_backend("xformers")
        with caplog.at_level(logging.WARNING, logger="lgd.models.dit"):
            first, second = model(x, t, y), model(x, t, y)
    assert model.attention_backend == "xformers"
    assert sum("xformers" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(first, sdpa)
    torch.testing.assert_close(second, sdpa)


def test_label_dropout_only_in_train_mode():
    model = _tiny_dit(class_dropout_prob=1.0)
    y = torch.tensor([0, 5])
    null_row = model.y_embedder.embedding_table.weight[NUM_CLASSES]
    assert not torch.equal(model.y_embedder(y)[0], null_row)  # eval: labels kept
    model.train()
    assert torch.equal(model.y_embedder(y), null_row.expand(2, -1))


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    state = _tiny_dit().state_dict()
    state["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.proj\.weight.*\(64, 32\).*\(64, 64\)"):
        load_dit(tmp_path / "bad.pt")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _tiny_dit().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias.*unexpected keys: extra"):
        load_dit(tmp_path / "bad.pt")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_dit(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_dit(tmp_path / "junk.pt")
    save_dit(_tiny_dit(), tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_dit(tmp_path / "cut.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers DiT folder"):
        load_dit(tmp_path / "empty")


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_config_inferred_from_registry_weights(name):
    with torch.device("meta"):  # shapes only: no memory for XL
        state = DiT(DIT_CONFIGS[name]).state_dict()
    assert infer_dit_config(state) == DIT_CONFIGS[name]


def test_unknown_width_needs_num_heads(tmp_path):
    model = _randomise(DiT(DiTConfig(input_size=4, hidden_size=96, depth=1, num_heads=3, num_classes=3)))
    torch.save(model.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(tmp_path / "odd.pt")
    loaded = load_dit(tmp_path / "odd.pt", num_heads=3)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([3.0, 700.0]), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y))


def test_save_dit_keeps_config_and_rejects_conflicting_heads(tmp_path):
    model = _tiny_dit(class_dropout_prob=0.25)
    save_dit(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    assert load_dit(tmp_path / "m.safetensors").config == model.config
    with pytest.raises(CheckpointError, match="num_heads"):
        load_dit(tmp_path / "m.safetensors", num_heads=4)


def test_create_dit_rejects_unknown_names():
    with pytest.raises(ConfigError, match="DiT-XXL/2"):
        create_dit("DiT-XXL/2")
    with pytest.raises(ConfigError, match="depthh"):
        create_dit("DiT-T/2", depthh=3)
