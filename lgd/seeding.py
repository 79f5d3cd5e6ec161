"""Deterministic per-sample randomness.

Every generated image owns a seed derived from its identity (run seed, stage, class, slot,
candidate), so results do not depend on batch size, batch order or the number of processes.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of keys (stable across Python runs and machines)."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class NoiseStream:
    """One torch.Generator per sample; draws a batch of independent per-sample normals."""

    def __init__(self, seeds: list[int], device: torch.device | str = "cpu"):
        self.seeds = list(seeds)
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        return torch.stack(
            [torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def derived(self, tag: str) -> "NoiseStream":
        """Independent streams for the same samples (per-sample seeds derived from theirs and tag)."""
        return NoiseStream([derive_seed(s, tag) for s in self.seeds], self.device)
