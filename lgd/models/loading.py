"""Load and save DiT weights: official state dicts, diffusers folders, and our own safetensors.

Every format is turned into our (= the official) key layout, the config is inferred from the
weight shapes, and keys and shapes are checked before anything is loaded, so a bad checkpoint
fails with a CheckpointError that names the key instead of a torch traceback.

diffusers mapping (DiTTransformer2DModel -> ours):
  pos_embed.proj                               -> x_embedder.proj
  transformer_blocks.0.norm1.emb.timestep_embedder.linear_{1,2} -> t_embedder.mlp.{0,2}
  transformer_blocks.0.norm1.emb.class_embedder.embedding_table -> y_embedder.embedding_table
    (diffusers keeps a copy of both embedders in every block; they must all be equal)
  transformer_blocks.i.norm1.linear            -> blocks.i.adaLN_modulation.1
  transformer_blocks.i.attn1.to_{q,k,v}        -> blocks.i.attn.qkv (concatenated q, k, v)
  transformer_blocks.i.attn1.to_out.0          -> blocks.i.attn.proj
  transformer_blocks.i.ff.net.0.proj / ff.net.2 -> blocks.i.mlp.fc1 / fc2
  proj_out_1 / proj_out_2                      -> final_layer.adaLN_modulation.1 / final_layer.linear
  pos_embed (not stored by diffusers)          -> recomputed sin-cos table
Numerics follow the official DiT, not diffusers' defaults: diffusers embeds timesteps with
frequencies exp(-ln(10000) * i / (half - 1)) (downscale_freq_shift=1) where the official model
uses / half, and its MLP-side LayerNorm uses norm_eps (default 1e-5) where the official uses 1e-6.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lgd.errors import CheckpointError, ConfigError, first_line
from lgd.files import atomic_path
from lgd.models.dit import DIT_CONFIGS, DiT, DiTConfig, sincos_pos_embed_2d

_METADATA_KEY = "lgd_dit_config"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Public API


def save_dit(model: DiT, path: str | os.PathLike) -> None:
    """Write weights + config to one safetensors file, atomically."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(dataclasses.asdict(model.config))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_weights(value: str, what: str) -> str:
    """The local path of `what`'s weights: `value` itself, the embedded demo model for "demo",
    or for a Hugging Face hub id (e.g. facebook/DiT-XL-2-256) its copy in the local cache.
    lgd never downloads: a hub id that is not cached is one clear error."""
    kind = what.lstrip("-").split(".")[-1]  # model.dit or --dit -> dit
    if value == "demo":
        from lgd.demo.models import demo_paths

        return str(demo_paths()[kind])
    if Path(value).exists() or not HUB_ID.fullmatch(value):
        return value
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(value, local_files_only=True)
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{what}={value} is neither a local path nor in the local Hugging Face cache; lgd "
                              f"never downloads: fetch it first (huggingface-cli download {value}) or give a path") from None


def load_dit(
    path: str | os.PathLike,
    *,
    num_heads: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> DiT:
    """Load a DiT in eval mode from an official .pt/.pth state dict (optionally under "ema"/"model"),
    a diffusers DiTTransformer2DModel folder or DiTPipeline folder, or a file written by save_dit.

    num_heads is needed only when the checkpoint does not say and its width is not a registry
    width. dtype None means float32.
    """
    path = Path(path)
    config, state = _config_and_state(path, num_heads, lazy=False)
    if "pos_embed" not in state:  # diffusers does not store the fixed table
        state["pos_embed"] = sincos_pos_embed_2d(config.hidden_size, config.grid_size)[None]
    with torch.device("meta"):  # no throw-away random init of a possibly huge model
        model = DiT(config)
    _check_state(model, state, path)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def read_dit_config(path: str | os.PathLike, num_heads: int | None = None) -> DiTConfig:
    """A checkpoint's DiTConfig from its header and weight shapes, without reading the weights
    (safetensors headers, torch files memory-mapped): a checkpoint that does not fit the data
    is found before a load of gigabytes."""
    return _config_and_state(Path(path), num_heads, lazy=True)[0]


def _config_and_state(path: Path, num_heads: int | None, lazy: bool) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    state, hints = _read(path, lazy)
    if any(k.startswith("transformer_blocks.") for k in state):
        state = _from_diffusers(state)
    heads = _pick_heads(path, hints.get("num_heads"), num_heads)
    config = hints.get("config") or infer_dit_config(
        state, num_heads=heads, input_size=hints.get("input_size"), source=path
    )
    return config, state


def infer_dit_config(
    state: dict[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    input_size: int | None = None,
    source: str | os.PathLike = "checkpoint",
) -> DiTConfig:
    """Derive a DiTConfig from official-layout weight shapes (heads: argument, else the registry
    entry of the same width; input_size: argument, else the pos_embed table)."""
    hidden, in_channels, patch, _ = _shape(state, "x_embedder.proj.weight", source)
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    num_classes = _shape(state, "y_embedder.embedding_table.weight", source)[0] - 1
    out = _shape(state, "final_layer.linear.weight", source)[0] // (patch * patch)
    if out not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"{source}: final_layer.linear.weight gives {out} output channels for {in_channels} input channels "
            f"(expected {in_channels} or {2 * in_channels})"
        )
    mlp_ratio = _shape(state, "blocks.0.mlp.fc1.weight", source)[0] / hidden if depth else 4.0
    if input_size is None:
        tokens = _shape(state, "pos_embed", source)[1]
        grid = round(tokens**0.5)
        if grid * grid != tokens:
            raise CheckpointError(f"{source}: pos_embed has {tokens} tokens, not a square grid")
        input_size = grid * patch
    if num_heads is None:
        num_heads = next((c.num_heads for c in DIT_CONFIGS.values() if c.hidden_size == hidden), None)
        if num_heads is None:
            raise CheckpointError(
                f"{source}: cannot tell the number of attention heads for hidden size {hidden}; "
                "pass num_heads=... to load_dit"
            )
    try:
        return DiTConfig(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                         learn_sigma=out == 2 * in_channels)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: inconsistent DiT weights: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Reading the formats: each returns (state dict, hints) where hints may hold "num_heads" and a
# full "config" (our files) or "num_heads"/"input_size" (diffusers config.json).


def _read(path: Path, lazy: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """lazy: tensors with the right shapes whose data are not read (meta or memory-mapped)."""
    if not path.exists():
        raise CheckpointError(f"no such checkpoint file or folder: {path}")
    if path.is_dir():
        return _read_diffusers_dir(path, lazy)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, lazy)
    return _read_torch(path, lazy), {}


def _read_torch(path: Path, lazy: bool = False) -> dict[str, torch.Tensor]:
    try:
        # Official training checkpoints also carry their argparse options under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
            except RuntimeError:
                if not lazy:
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # not a zip file: no mmap
    except Exception as exc:  # torch's own message is advice about weights_only, not about the file
        raise CheckpointError(f"cannot read {path} as a DiT checkpoint: expected an official .pt, an lgd "
                              f".safetensors or a diffusers folder (torch.load: {type(exc).__name__}: {first_line(exc)})") from None
    if isinstance(obj, dict):
        obj = obj.get("ema", obj.get("model", obj))  # training checkpoints: EMA weights sample best
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def _read_safetensors(path: Path, lazy: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if lazy:  # the header has every shape
                state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            else:
                state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {type(exc).__name__}: {exc}") from exc
    if _METADATA_KEY not in metadata:
        return state, {}  # a plain state dict in safetensors form: infer everything
    try:
        config = DiTConfig(**json.loads(metadata[_METADATA_KEY]))
    except (ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: invalid DiT config in metadata: {exc}") from exc
    return state, {"config": config, "num_heads": config.num_heads}


def _read_diffusers_dir(path: Path, lazy: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    if (path / "model_index.json").is_file():  # a whole DiTPipeline: the DiT is in transformer/
        path = path / "transformer"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a diffusers DiT folder (no config.json or model_index.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config_file}: {exc}") from exc
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise CheckpointError(f"{config_file}: norm_type {config['norm_type']!r} is not a DiT (ada_norm_zero)")
    hints = {k: config[c] for k, c in (("num_heads", "num_attention_heads"), ("input_size", "sample_size"))
             if c in config}
    if (path / _DIFFUSERS_INDEX).is_file():
        return _read_sharded(path / _DIFFUSERS_INDEX, lazy), hints
    safetensors_file, bin_file = (path / name for name in _DIFFUSERS_WEIGHTS)
    if safetensors_file.is_file():
        return _read_safetensors(safetensors_file, lazy)[0], hints
    if bin_file.is_file():
        return _read_torch(bin_file, lazy), hints
    raise CheckpointError(f"{path} holds no weights (expected one of {', '.join(_DIFFUSERS_WEIGHTS)})")


def _read_sharded(index: Path, lazy: bool = False) -> dict[str, torch.Tensor]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read shard index {index}: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(_read_safetensors(index.parent / shard, lazy)[0])
    return state


def _pick_heads(path: Path, stored: int | None, requested: int | None) -> int | None:
    if stored is not None and requested is not None and stored != requested:
        raise CheckpointError(f"{path}: the checkpoint says num_heads={stored} but num_heads={requested} was requested")
    return stored if stored is not None else requested


# ---------------------------------------------------------------------------------------------
# diffusers layout -> ours

_RENAMES = [
    (r"pos_embed\.proj\.", "x_embedder.proj."),
    (r"transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"transformer_blocks\.0\.norm1\.emb\.class_embedder\.", "y_embedder."),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.", r"blocks.\1.adaLN_modulation.1."),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.fc1."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.fc2."),
    (r"proj_out_1\.", "final_layer.adaLN_modulation.1."),
    (r"proj_out_2\.", "final_layer.linear."),
]
_EMBEDDER_COPY = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")
_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)")


def _from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        copy = _EMBEDDER_COPY.fullmatch(key)
        if copy and copy.group(1) != "0":
            reference = f"transformer_blocks.0.norm1.emb.{copy.group(2)}"
            lazy = value.is_meta  # shapes only (read_dit_config): the values are checked by the full load
            if reference not in state or not (lazy or torch.equal(state[reference], value)):
                raise CheckpointError(
                    f"diffusers checkpoint: {key} differs from {reference}; the per-block copies of the "
                    "timestep/class embedder must be identical"
                )
            continue
        if m := _QKV.fullmatch(key):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = (key, value)
            continue
        for pattern, replacement in _RENAMES:
            new, n = re.subn(f"^{pattern}", replacement, key)
            if n:
                key = new
                break
        out[key] = value  # unknown keys pass through and are reported as unexpected
    for (block, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[c][1] for c in "qkv"])
        else:  # incomplete: keep the originals so the key check names them
            out.update(dict(parts.values()))
    return out


# ---------------------------------------------------------------------------------------------
# Checks


def _shape(state: dict[str, torch.Tensor], key: str, source) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key} (is this a DiT checkpoint?)")
    return tuple(state[key].shape)


def _check_state(model: DiT, state: dict[str, torch.Tensor], source) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing keys: {', '.join(missing)}"] if missing else []
        parts += [f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{source} does not match the inferred {model.config}: " + "; ".join(parts))
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)} in the checkpoint but the model "
                f"expects {tuple(tensor.shape)}"
            )

