"""Choose the demo preset's settings on a validation split, and measure what each one does.

    python benchmarks/demo_ablation.py --out runs/ablation                 # every variant
    python benchmarks/demo_ablation.py --out runs/ablation --only base "lam 0"

Every variant is the demo preset plus `data.evaluate_on=validation` plus its own overrides: it
trains (the reference model, the stage models, the Random baseline) on the embedded training
images less 100 per class, and it is scored on those 100 per class. The test split is never
read, so the settings chosen here can be reported on it honestly. Each variant is one
`lgd distill` and one `lgd evaluate` (LGD only; "base" also evaluates the baselines and runs
the cross-increment analysis; the DiT-set variants, which change only how the DiT set is
sampled, the DiT set alone), in <out>/<variant>/; finished ones are reused. Writes
<out>/ablation.json and <out>/ablation.md (a markdown table, best-first within each group).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _runs import measure_all, seconds_of, timed

VALIDATION = ["data.evaluate_on=validation"]
NO_BASELINES = ["eval.baselines=[]"]
# The group whose variants are scored on the DiT set: the CFG the plain DiT set is sampled at
# (sampling.unguided_cfg_scale; the preset's is 1), which does not touch the LGD set.
DIT_SET_GROUP = "the DiT set's CFG"
SET_NAMES = {"lgd": "LGD", "dit": "DiT"}

# name -> (group, overrides). Each group changes one setting of the base (the demo preset).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("base", []),
    "lam 0": ("guidance strength lam", ["lgd.lam=0"]),
    "lam 15": ("guidance strength lam", ["lgd.lam=15"]),
    "lam 60": ("guidance strength lam", ["lgd.lam=60"]),
    "kappa 1": ("candidates kappa", ["lgd.kappa=1"]),
    "omega 0": ("reference weight omega", ["lgd.omega=0"]),
    "omega 0.5": ("reference weight omega", ["lgd.omega=0.5"]),
    "initial dit": ("initial increment", ["stages.initial=dit"]),
    "initial random": ("initial increment", ["stages.initial=random"]),
    "cfg 1": ("CFG scale", ["sampling.cfg_scale=1"]),
    "cfg 1.5": ("CFG scale", ["sampling.cfg_scale=1.5"]),
    "cfg 3": ("CFG scale", ["sampling.cfg_scale=3"]),
    "dit cfg 1.5": (DIT_SET_GROUP, ["sampling.unguided_cfg_scale=1.5"]),
    "dit cfg 2": (DIT_SET_GROUP, ["sampling.unguided_cfg_scale=2"]),
    "stage epochs 50": ("stage model budget", ["lgd.stage_model.epochs=50"]),
    "stage epochs 200": ("stage model budget", ["lgd.stage_model.epochs=200"]),
    "gamma 0": ("deviation guidance gamma", ["lgd.gamma=0"]),
    "gamma 6.25": ("deviation guidance gamma", ["lgd.gamma=6.25"]),
    "window all": ("guidance window", ["lgd.window=[0,24]"]),
    "window noisy": ("guidance window", ["lgd.window=[12,22]"]),
}


def scored_set(name: str) -> str:
    """The set a variant is measured on: the DiT set for the DiT-set group, else LGD."""
    return "dit" if VARIANTS[name][0] == DIT_SET_GROUP else "lgd"


def run_variant(out: Path, name: str, preset: str, runs: int | None, extra: list[str]) -> dict:
    group, overrides = VARIANTS[name]
    folder = out / name.replace(" ", "_")
    base, scored = name == "base", scored_set(name)
    baselines = [] if base else (["eval.baselines=[dit]"] if scored == "dit" else NO_BASELINES)
    if not (folder / "done.json").is_file():
        timed(folder, "distill", "--config", preset, "--out", str(folder), "--no-progress",
              *VALIDATION, *baselines, *overrides, *extra)
    results_file = folder / "eval" / "results.json"
    if not results_file.is_file():
        timed(folder, "evaluate", str(folder), "--no-progress", *(["--runs", str(runs)] if runs else []),
              *([] if base else ["--sets", scored]))
    if base and not (folder / "eval" / "analyses.json").is_file():
        timed(folder, "analyze", str(folder), "--no-progress", "--analyses", "cross")
    results = json.loads(results_file.read_text())
    timing = seconds_of(folder)
    row = {"variant": name, "group": group, "overrides": overrides, "scored": scored, "runs": results["runs"],
           "seconds": sum(timing.values()) if timing else None}  # None: run before times were kept
    for network, cells in results["accuracy"].items():
        row.update({f"{s}": cells[s] for s in cells})
    analyses = folder / "eval" / "analyses.json"
    if analyses.is_file():
        sets = json.loads(analyses.read_text())["sets"]
        row["off_diagonal"] = {s: r["cross_increment"]["off_diagonal_mean"] for s, r in sets.items()
                               if "cross_increment" in r}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| group | variant | overrides | validation top-1 % |", "|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for group, members in groups.items():
        scored = members[0].get("scored", "lgd")  # rows stored before the DiT-set group: LGD
        for row in sorted(members, key=lambda r: -r[scored]["mean"]):
            cell = f"{SET_NAMES[scored]} {row[scored]['mean']:.1f} ± {row[scored]['std']:.1f}"
            lines.append(f"| {group} | {row['variant']} | {' '.join(row['overrides']) or '(demo preset)'} | {cell} |")
    base = next((r for r in rows if r["variant"] == "base"), None)
    if base:
        others = [f"{s} {base[s]['mean']:.1f} ± {base[s]['std']:.1f}" for s in ("random", "dit", "igd") if s in base]
        lines += ["", "Base baselines on the same split: " + ", ".join(others) + "."]
        if "off_diagonal" in base:
            lines += ["Cross-increment off-diagonal mean: " +
                      ", ".join(f"{s} {v:.1f}" for s, v in base["off_diagonal"].items() if v is not None) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the variants' run directories")
    parser.add_argument("--preset", default="demo", help="the config the variants change")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants (default: all)")
    parser.add_argument("--runs", type=int, help="evaluation trainings per set (default: the preset's)")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="section.key=value overrides for every variant (e.g. threads=1 to run two at once)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    measure_all(out, "ablation", args.only or VARIANTS,
                lambda name: run_variant(out, name, args.preset, args.runs, args.overrides), table)


if __name__ == "__main__":
    main()
