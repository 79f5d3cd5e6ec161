"""Diffusion Transformer (DiT) with adaLN-Zero conditioning, written from the method description.

Sections follow the data flow: embedders (timestep, label, patch, position), attention, block,
final layer, the model with `forward_with_cfg`, then the registry of named configs.
Module and parameter names equal the official checkpoint keys, so `state_dict()` is the official
format (x_embedder.proj.*, t_embedder.mlp.{0,2}.*, y_embedder.embedding_table.weight, pos_embed,
blocks.{i}.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2,adaLN_modulation.1}.*, final_layer.*).

Numerical conventions are the official DiT ones (diffusers' DiTTransformer2DModel differs slightly,
see lgd/models/loading.py): timestep frequencies exp(-ln(10000) * i / half) with cos before sin,
and every LayerNorm uses eps 1e-6.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lgd.errors import ConfigError
from lgd.kernels.adaln_norm import adaln_modulate

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "math", "xformers")
FREQUENCY_EMBEDDING_SIZE = 256


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the embedding table has one more row: the null class for CFG
    learn_sigma: bool = True  # output eps and the variance interpolation v (2x channels)
    class_dropout_prob: float = 0.1  # training-time label dropout to the null class

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ConfigError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            # The 2-D sin-cos position embedding splits the width into 4 equal sin/cos parts.
            raise ConfigError(f"hidden_size {self.hidden_size} must be a multiple of 4")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ConfigError(f"class_dropout_prob {self.class_dropout_prob} is outside [0, 1]")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size


# ---------------------------------------------------------------------------------------------
# Embedders


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos | sin] of t at frequencies max_period^(-i/half), i = 0..half-1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # last row: null class
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens [B, T, D] in row-major order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding [grid^2, dim]: first half encodes the column, second the row.

    Each half is [sin | cos] of the coordinate at frequencies 10000^(-j/(dim/4)), j = 0..dim/4-1.
    Computed in float64 and rounded once, as the official checkpoints' stored tables are.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # token n = row * grid + col

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


# ---------------------------------------------------------------------------------------------
# Attention


@functools.lru_cache(maxsize=None)
def xformers_usable(device: str) -> bool:
    """True when xformers imports and its attention runs on `device`; warns once per device if not."""
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 2, 1, 8, device=device)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception as exc:  # ImportError, or NotImplementedError/RuntimeError from a CUDA-only build
        logger.warning("xformers attention does not run on %s (%s: %s); using PyTorch SDPA instead",
                       device, type(exc).__name__, exc)
        return False


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, H, N, d]; plain ops, so double backward works."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        if self.backend == "xformers" and xformers_usable(str(x.device)):
            import xformers.ops as xops

            out = xops.memory_efficient_attention(*qkv.unbind(2))  # [B, N, H, d] layout
            return self.proj(out.reshape(B, N, D))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
        out = math_attention(q, k, v) if self.backend == "math" else F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


# ---------------------------------------------------------------------------------------------
# adaLN-Zero block and final layer
# LN(x) * (1 + scale) + shift (LayerNorm without affine weights, eps 1e-6) is one op,
# `adaln_modulate`: fused Triton kernels on CUDA, the plain torch twin elsewhere. It holds no
# parameters, so the checkpoint keys are unchanged.


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(adaln_modulate(x, shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(adaln_modulate(x, shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(adaln_modulate(x, shift, scale))


# ---------------------------------------------------------------------------------------------
# Model


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        # Persistent so state_dict() matches the official checkpoints, which store the table.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, config.grid_size)[None], persistent=True)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight  # initialised like a linear layer on flattened patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model output starts at zero.
        for layer in [b.adaLN_modulation[1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[1], self.final_layer.linear
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def attention_backend(self) -> str:
        return self.blocks[0].attn.backend if len(self.blocks) else "sdpa"

    def set_attention_backend(self, backend: str) -> DiT:
        """Choose "sdpa" (default), "math" (double-backward safe) or "xformers" (falls back to sdpa
        with one warning on devices where xformers does not run)."""
        if backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
        for block in self.blocks:
            block.attn.backend = backend
        return self

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] (per-token layout p, q, c) -> [B, C, H, W]."""
        p, C, g = self.config.patch_size, self.config.out_channels, self.config.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] latents, t [B] original timesteps (or a scalar), y [B] labels
        (num_classes = null) -> [B, out_channels, H, W]."""
        size = self.config.input_size
        if tuple(x.shape[-2:]) != (size, size) or x.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"DiT expects input [B, {self.config.in_channels}, {size}, {size}], got {list(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: int | None = None,
        both_rows: bool = False,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched forward (conditional half, then null-class half).

        eps = eps_u + s * (eps_c - eps_u) on the first `cfg_channels` eps channels (None = all;
        3 reproduces the official DiT sampler); other eps channels and v come from eps_c's pass.
        both_rows: also return the null-class row as the official sampler makes it (2B rows: the
        guided eps channels, then eps_u's other channels and v), for IGD's official decode.
        """
        C = self.config.in_channels
        k = C if cfg_channels is None else cfg_channels
        if not 0 <= k <= C:
            raise ConfigError(f"cfg_channels must be in [0, {C}] or None, got {cfg_channels}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        null = torch.full_like(y, self.config.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        if both_rows:
            return torch.cat([torch.cat([guided, cond[:, k:]], dim=1), torch.cat([guided, uncond[:, k:]], dim=1)])
        return torch.cat([guided, cond[:, k:]], dim=1)


# ---------------------------------------------------------------------------------------------
# Registry

_SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}

DIT_CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{p}": DiTConfig(patch_size=p, depth=d, hidden_size=h, num_heads=n)
    for size, (d, h, n) in _SIZES.items()
    for p in (2, 4, 8)
}
DIT_CONFIGS["DiT-T/2"] = DiTConfig(patch_size=2, depth=2, hidden_size=64, num_heads=2)  # tests


def create_dit(name: str, **overrides) -> DiT:
    """Build a freshly initialised DiT from a registry name, e.g. create_dit("DiT-XL/2", num_classes=10)."""
    if name not in DIT_CONFIGS:
        raise ConfigError(f"unknown DiT config {name!r}; known: {', '.join(DIT_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown DiT config field(s) {unknown}; known: {sorted(fields)}")
    return DiT(dataclasses.replace(DIT_CONFIGS[name], **overrides))
