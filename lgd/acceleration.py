"""Speed switches for the generator: torch.compile and mixed precision, each off by default.

`apply_speedups(dit, codec, compile=..., precision=...)` patches instance attributes only
(`dit.forward`, `dit.forward_with_cfg`, `codec.decode`, `codec.encode`, the VAE decoder's
`forward`), so state_dict keys, the Sampler and every caller are unchanged. With compile off
and fp32 nothing is touched at all.

Precision is autocast around the DiT and VAE calls and nothing else: their outputs are cast
back to fp32, so latents, the DDPM step and every guidance loss run in fp32 outside any
autocast region. In particular IGD's classifier double backward (InfluenceLoss) never runs
under fp16 autocast, which gives NaN with a double `autograd.grad` (docs/measured-facts.md).
The DiT and VAE are only differentiated to first order, which low precision supports.
Low precision errs most where guidance looks: x0_hat = (x_t - sqrt(1-abar) eps) / sqrt(abar)
multiplies the eps error by up to 1/sqrt(abar) (~160 at t = 999); measured, a bf16 DiT turns
the guidance gradient by cos 0.64-0.73 against fp32 at t >= 800. `fp32_guidance` keeps the
guided steps in fp32 and the low precision for everything without a gradient.

Compile covers the DiT's `forward` / `forward_with_cfg` and the VAE decoder with
fullgraph=True. On CPU it also switches both models' attention to the plain softmax(q k^T) v
form, which inductor fuses: PyTorch's CPU flash-attention kernel is slow at their sequence
lengths (measured on the demo's compiled LGD step: 137 ms against 144 ms with SDPA).
IGD's double-backward region is compiled separately, as the torch.func transform
`InfluenceLoss.input_gradient` (aot_autograd cannot compile a double backward taken through
autograd.grad, docs/measured-facts.md); the LGD classifiers stay eager.

Where the kernel policy (lgd.kernels.policy) runs the fused GroupNorm+SiLU Triton kernel on
the device, the VAE decoder's GroupNorm+SiLU pairs are swapped for it; elsewhere the decoder is
left as it is. `tf32` scopes TF32 for the fp32 matmuls and convolutions on CUDA.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn

from lgd.errors import ConfigError
from lgd.kernels import policy
from lgd.models.vae import LatentCodec, checkpoint_decoder_blocks, fuse_group_norm_silu

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Measured with torch 2.13 (CPU inductor): with its default channels-last layout optimisation the
# compiled diffusers VAE decoder returns an ALL-ZERO input gradient (forward is correct). The
# pattern is GroupNorm -> conv -> conv, residual add, `/ output_scale_factor`, nearest 2x
# upsample, conv: the backward kernel reads the upsample-gradient buffer right after zeroing it,
# before the scatter-add fills it. Turning the layout optimisation off gives the eager gradient
# (rel. error ~1e-6). tests/test_acceleration.py checks the decoder's input gradient.
_DECODER_INDUCTOR_OPTIONS = {"layout_optimization": False}


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for `precision` on `device`. "auto": bf16 on CUDA GPUs with native bf16
    (compute capability 8.0 and up: A100, H100, ...), else fp32 (so always fp32 on CPU). Older
    GPUs only emulate bf16 (`torch.cuda.is_bf16_supported()` says yes on a V100 or T4), slowly."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"precision bf16 was requested but this GPU (compute capability {major}.{minor}) has no "
                          "native bf16 (8.0 or newer needed); use fp16 or fp32")
    return _DTYPES[precision]


def native_bf16(device: torch.device) -> bool:
    """A CUDA device with bf16 tensor cores (compute capability >= 8.0)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 (on or off) for the fp32 matmuls and cuDNN convolutions of the block, restored after.
    Only CUDA reads these switches; torch's defaults are off for matmuls, on for cuDNN."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _autocast_fp32_out(fn: Callable, device_type: str, dtype: torch.dtype, fp32_with_grad: bool) -> Callable:
    """fn under autocast(dtype), its tensor result cast back to fp32 after the region ends.
    fp32_with_grad: calls made with grad enabled (the guided steps) run in plain fp32."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if fp32_with_grad and torch.is_grad_enabled():
            return fn(*args, **kwargs).float()
        with torch.autocast(device_type, dtype=dtype):
            out = fn(*args, **kwargs)
        return out.float()

    return run


def apply_speedups(
    dit: nn.Module, codec: nn.Module | None = None, *, compile: bool = False, precision: str = "auto",
    fp32_guidance: bool = False, checkpoint_decoder: bool = False,
) -> torch.dtype:
    """Switch on torch.compile and/or autocast for a DiT and its latent codec, in place.

    fp32_guidance: the low precision applies only to calls without grad (unguided steps,
    decoding kept samples); guided steps, which differentiate the DiT and the decoder, run in
    fp32. checkpoint_decoder: activation checkpointing of the VAE decoder's blocks in guided
    steps (lgd.models.vae.checkpoint_decoder_blocks). Returns the compute dtype chosen. The codec may be a LatentCodec (VAE) or any other codec
    (e.g. IdentityCodec), which has nothing to accelerate and is left alone. Apply once, after
    the models are on their device and in eval mode.
    """
    if getattr(dit, "_lgd_speedups", None) is not None:
        raise ConfigError("speedups are already applied to this DiT; apply them once per loaded model")
    if compile and getattr(dit, "attention_backend", None) == "xformers":
        # dynamo cannot trace the xformers import/probe in Attention (measured: "Unsupported:
        # Import failure"), so fullgraph=True would fail at the first call.
        raise ConfigError("torch.compile cannot trace the xformers attention backend; "
                          "use the default sdpa backend when compiling")
    device = next(dit.parameters()).device
    dtype = resolve_precision(precision, device)
    lowp = dtype != torch.float32
    dit._lgd_speedups = (compile, dtype)
    if compile and device.type == "cpu":
        dit.set_attention_backend("math")
        if isinstance(codec, LatentCodec):
            # imported here, not at the top: every `lgd evaluate` process imports this module
            # for its trainings and never touches a VAE (measured: its import 4.3 -> 3.3 s)
            from diffusers.models.attention_processor import AttnProcessor

            codec.vae.set_attn_processor(AttnProcessor())

    # forward_with_cfg calls self(...), i.e. the patched forward below; when both are
    # compiled, dynamo inlines the inner one into the CFG graph.
    for name in ("forward", "forward_with_cfg"):
        fn = getattr(dit, name)
        if compile:
            fn = torch.compile(fn, fullgraph=True)
        if lowp:
            fn = _autocast_fp32_out(fn, device.type, dtype, fp32_guidance)
        if compile or lowp:
            setattr(dit, name, fn)

    if isinstance(codec, LatentCodec):
        if policy.backend("group_norm_silu", device) == "triton":
            fuse_group_norm_silu(codec.vae.decoder)
        if checkpoint_decoder:
            checkpoint_decoder_blocks(codec.vae.decoder)
        if compile:
            decoder = codec.vae.decoder
            decoder.forward = torch.compile(decoder.forward, fullgraph=True, options=_DECODER_INDUCTOR_OPTIONS)
        if lowp:
            codec.decode = _autocast_fp32_out(codec.decode, device.type, dtype, fp32_guidance)
            codec.encode = _autocast_fp32_out(codec.encode, device.type, dtype, fp32_guidance)
    return dtype
