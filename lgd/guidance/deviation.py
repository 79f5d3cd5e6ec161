"""Deviation guidance (kept from IGD): push x_t away from the most similar kept latent.

Each class keeps a memory of the final latents of its kept samples; inside the window the
sample moves down the gradient of cos(x_t, m*), m* being the memory entry most
cosine-similar to x_t. The gradient of a cosine is closed-form, so no autograd graph is
needed.
"""
from __future__ import annotations

from collections import defaultdict, deque

import torch
import torch.nn.functional as F


class ClassMemory:
    """The most recent `capacity` kept latents of every class."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: dict[int, deque[torch.Tensor]] = defaultdict(lambda: deque(maxlen=capacity))

    def add(self, cls: int, latent: torch.Tensor) -> None:
        self._entries[int(cls)].append(latent.detach().flatten().float().cpu())

    def items(self) -> list[tuple[int, torch.Tensor]]:
        """(class, flattened latent) for every entry, classes in increasing order."""
        return [(cls, e) for cls, items in sorted(self._entries.items()) for e in items]

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


class Deviation:
    """-gamma * grad cos(x_t, m*) per sample, m* = the most cosine-similar entry of the
    sample's class memory (zero where the class has none). The memory is frozen into one
    device tensor when the term is built, so each step is a few batched ops, no host sync."""

    def __init__(self, memory: ClassMemory, gamma: float, device: torch.device | str = "cpu",
                 classes: list[int] | None = None):
        self.gamma = gamma
        entries = [(cls, e) for cls, e in memory.items() if classes is None or cls in classes]
        self.bank = torch.stack([e for _, e in entries]).to(device) if entries else None
        self.unit_bank = F.normalize(self.bank, dim=1) if entries else None  # fixed: normalised once
        self.owner = torch.tensor([cls for cls, _ in entries], device=device) if entries else None

    def __call__(self, x_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.bank is None or self.gamma == 0:
            return torch.zeros_like(x_t)
        x = x_t.detach().flatten(1).float()
        similarity = F.normalize(x, dim=1) @ self.unit_bank.T
        same_class = self.owner[None, :] == labels[:, None]
        nearest = similarity.masked_fill(~same_class, float("-inf")).argmax(dim=1)
        step = -self.gamma * cosine_gradient(x, self.bank[nearest])
        has_memory = same_class.any(dim=1, keepdim=True)
        return torch.where(has_memory, step, torch.zeros_like(step)).view_as(x_t).to(x_t.dtype)
