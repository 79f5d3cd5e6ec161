"""How far IGD's official both-rows decode turns the guidance: cosine between the influence
correction with igd.decode_rows=both (the official sampler: the sample's and its null-class CFG
row's Tweedie estimates in the loss) and with the default conditional row only, at every guided
step of one sampling run from the same states.

    python benchmarks/igd_rows.py [--config demo] [--out benchmarks/results/igd_rows.json]

The run follows the both-rows trajectory; at each guided step the conditional-only correction
is recomputed from the same x_t on a fresh graph. Deviation guidance is off in both (it is the
same term either way). Trains the config's IGD surrogate first (the demo's: seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from lgd.config import load_config
from lgd.guidance import ClassMemory, InfluenceGuidance
from lgd.guidance.factory import guidance_factory
from lgd.pipeline import Distiller
from lgd.seeding import NoiseStream, derive_seed


class Compare:
    """A both-rows guidance that also computes the conditional-only correction of each step."""

    def __init__(self, both: InfluenceGuidance, conditional: InfluenceGuidance, sampler):
        self.both, self.conditional, self.sampler = both, conditional, sampler
        self.null_rows = True
        self.nonfinite = both.nonfinite
        self.cosines: list[list[float]] = []

    def active(self, i: int) -> bool:
        return self.both.active(i)

    def __call__(self, x_t, i, eps, x0_hat, labels):
        g_both = self.both(x_t, i, eps, x0_hat, labels)
        with torch.enable_grad():
            fresh = x_t.detach().requires_grad_(True)
            out = self.sampler.model_output(fresh, i, labels)
            eps_c = out[:, : fresh.shape[1]]
            x0_c = self.sampler.diffusion.predict_x0(fresh, i, eps_c)
            g_cond = self.conditional(fresh, i, eps_c, x0_c, labels)
        self.cosines.append(F.cosine_similarity(g_both.flatten(1), g_cond.flatten(1), dim=1).tolist())
        return g_both


def measure(config_name: str, overrides: list[str], classes: int | None = None) -> dict:
    config = load_config(config_name, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        distiller = Distiller(config, Path(tmp) / "run", progress=False)
        try:
            distiller.prepare()
            loss, sampler = distiller.influence_loss(), distiller.generator.sampler

            def make(rows: str):  # the pipeline's IGD guidance with these decode rows, no deviation
                c = dataclasses.replace(config, igd=dataclasses.replace(config.igd, decode_rows=rows, gamma=0.0))
                return guidance_factory("igd", c, codec=distiller.generator.codec,
                                        alphas_cumprod=sampler.diffusion.alphas_cumprod, memory=ClassMemory(1),
                                        device=distiller.device, influence=loss)([])

            compare = Compare(make("both"), make("conditional"), sampler)
            n = classes or distiller.num_classes
            labels = torch.tensor([distiller.candidates.dit_classes[c] for c in range(n)], device=distiller.device)
            noise = NoiseStream([derive_seed(config.seed, "igd-rows", c) for c in range(n)], distiller.device)
            with torch.no_grad():
                sampler.sample(labels, noise, compare, targets=torch.arange(n, device=distiller.device))
        finally:
            distiller.close()
    flat = [c for step in compare.cosines for c in step]
    return {"config": config_name, "overrides": overrides, "samples": n, "guided_steps": len(compare.cosines),
            "cosine": {"min": min(flat), "median": statistics.median(flat), "max": max(flat)},
            "per_step_median": [statistics.median(step) for step in compare.cosines]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "igd_rows.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    result = measure(args.config, args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    c = result["cosine"]
    print(f"cos(both rows, conditional row) over {result['guided_steps']} guided steps x {result['samples']} samples: "
          f"min {c['min']:.3f}, median {c['median']:.3f}, max {c['max']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
