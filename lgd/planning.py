"""How a stage's work is cut into rounds and batches: a pure function of the config's numbers.

A round takes the next `round_slots` slots of every class; its candidates, in (class, slot,
candidate) order, are cut into batches of whole kappa-groups of at most `batch_size`
candidates (at least one group). Batches are cut from all of a round's jobs, finished or not,
so a resumed run recomputes an unfinished batch exactly as the first run composed it; and the
cut does not depend on the process count, so neither does the distilled set.
"""
from __future__ import annotations

from dataclasses import dataclass

Job = tuple[int, int, int]  # (class, slot, candidate)


@dataclass(frozen=True)
class Round:
    slots: list[int]  # the slots of every class this round fills
    batches: list[list[Job]]


def plan_rounds(slots: range, num_classes: int, round_slots: int, batch_size: int, kappa: int = 1) -> list[Round]:
    per_batch = max(1, batch_size // kappa) * kappa
    rounds = []
    for start in range(0, len(slots), round_slots):
        chunk = list(slots[start : start + round_slots])
        jobs = [(c, slot, cand) for c in range(num_classes) for slot in chunk for cand in range(kappa)]
        rounds.append(Round(chunk, [jobs[b : b + per_batch] for b in range(0, len(jobs), per_batch)]))
    return rounds
