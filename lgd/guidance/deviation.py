"""Deviation guidance (kept from IGD): push x_t away from the most similar kept latent.

Each class keeps a memory of the final latents of its kept samples; inside the window the
sample moves down the gradient of cos(x_t, m*), m* being the memory entry most
cosine-similar to x_t. The gradient of a cosine is closed-form, so no autograd graph is
needed.
"""
from __future__ import annotations

from collections import defaultdict, deque

import torch


class ClassMemory:
    """The most recent `capacity` kept latents of every class."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: dict[int, deque[torch.Tensor]] = defaultdict(lambda: deque(maxlen=capacity))

    def add(self, cls: int, latent: torch.Tensor) -> None:
        self._entries[int(cls)].append(latent.detach().flatten().float().cpu())

    def entries(self, cls: int) -> torch.Tensor | None:
        """[M, D] stacked entries of class `cls`, or None when it has none yet."""
        items = self._entries.get(int(cls))
        return torch.stack(list(items)) if items else None

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())


def cosine_gradient(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d cos(x, m) / dx for flattened rows: m/(|x||m|) - cos(x, m) x/|x|^2."""
    x_norm = x.norm(dim=1, keepdim=True)
    m_norm = m.norm(dim=1, keepdim=True)
    cos = (x * m).sum(dim=1, keepdim=True) / (x_norm * m_norm)
    return m / (x_norm * m_norm) - cos * x / x_norm**2


def deviation_step(x_t: torch.Tensor, labels: torch.Tensor, memory: ClassMemory, gamma: float) -> torch.Tensor:
    """The correction -gamma * grad cos(x_t, m*) per sample (zero for classes with no memory)."""
    flat = x_t.detach().flatten(1).float()
    correction = torch.zeros_like(flat)
    for cls in labels.unique().tolist():
        bank = memory.entries(cls)
        if bank is None:
            continue
        rows = (labels == cls).nonzero().squeeze(1)
        bank = bank.to(flat.device)
        x = flat[rows]
        nearest = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
        m_star = bank[nearest.argmax(dim=1)]
        correction[rows] = -gamma * cosine_gradient(x, m_star)
    return correction.view_as(x_t).to(x_t.dtype)
