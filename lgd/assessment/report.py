"""RUN/eval/report.md: the accuracy table, the analysis numbers and the plots, from the JSON
files that `lgd evaluate` and `lgd analyze` write (either may be missing)."""
from __future__ import annotations

from pathlib import Path

from lgd.assessment.accuracy import SET_ORDER, SET_TITLES
from lgd.files import atomic_path, read_json

NETWORK_TITLES = {
    **{f"convnet{d}": f"ConvNet-{d}" for d in range(3, 7)},
    "resnet_ap10": "ResNetAP-10",
    "resnet18": "ResNet-18",
}


def _title(name: str) -> str:
    return SET_TITLES.get(name, name)


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: SET_ORDER.index(n) if n in SET_ORDER else len(SET_ORDER))


def _recipe(recipe: dict) -> str:
    epochs = recipe["epochs"] if recipe.get("epochs") else "by IPC"
    return f"{recipe['recipe']} recipe, {epochs} epochs"


def _table(cells_by_network: dict, sets: list[str]) -> list[str]:
    lines = ["| Network | " + " | ".join(_title(s) for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for network, cells in cells_by_network.items():
        row = [f"{cells[s]['mean']:.1f} ± {cells[s]['std']:.1f}" if s in cells else "–" for s in sets]
        lines.append(f"| {NETWORK_TITLES.get(network, network)} | " + " | ".join(row) + " |")
    return lines


def _test_view(protocol: dict, size: int) -> str:
    if protocol.get("test_view") == "crop":
        return f"test images centre-cropped to {size} px from data.image_size"
    return f"test images resized to {size} px (Minimax/IDC)"


def accuracy_section(results: dict) -> list[str]:
    sets = _ordered(results["sets"])
    protocol = results.get("protocol", {"test_view": "crop", "periodic_tests": 0})
    validation = results.get("scored_on") == "validation"
    split = "the validation split (held-out training images)" if validation else "the real test set"
    lines = [
        f"## Top-1 accuracy on {split} (%)",
        "",
        f"Dataset {results['dataset']}, classifier input {results['classifier_size']} px, {_recipe(results['recipe'])}; "
        f"mean ± std over {results['runs']} run(s) from scratch, {results['test_images']} real {'validation' if validation else 'test'} images, "
        f"{_test_view(protocol, results['classifier_size'])}"
        + (f", soft labels from the teacher {protocol['teacher']} (RDED/SRe2L protocol)" if protocol.get("teacher") else "")
        + ". Accuracy after the last epoch:",
        "",
        *_table(results["accuracy"], sets),
    ]
    if results.get("best_epoch_accuracy"):
        lines += ["", f"Best-epoch (test-selected, as in IGD/Minimax): the best of {protocol['periodic_tests']} "
                  f"test evaluations, one every {protocol['eval_every']} epochs. The epoch is chosen on the test set "
                  "itself, so this is an optimistic figure, given for comparison with tables that report it:", "",
                  *_table(results["best_epoch_accuracy"], sets)]
    lines += ["", "Images per class: " + ", ".join(f"{_title(s)} {results['sets'][s]['ipc']}" for s in sets) + "."]
    if "machine" in results:  # another CPU computes other last bits, so the table names its own
        m = results["machine"]
        threads = f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
        lines += ["", f"Trained on {m['cpu']} ({m['cpu_capability']} kernels, {threads}, torch {m['torch']})."]
    for name, reason in results.get("skipped", {}).items():
        lines += ["", f"Not evaluated: {_title(name)} ({reason})."]
    return lines + [""] + samples_section(results.get("grids", {}))


def samples_section(grids: dict[str, str]) -> list[str]:
    """The sample grids side by side: one column per set, one row per class in each grid."""
    if not grids:
        return []
    names = [*_ordered(n for n in grids if n != "real"), *(["real"] if "real" in grids else [])]
    titles = [_title(n) if n != "real" else "Real" for n in names]
    return ["## Samples", "", "A few images per class, one row per class (class 0 at the top); Real: images of "
            "the split the table is scored on.", "",
            "| " + " | ".join(titles) + " |", "|" + "---|" * len(names),
            "| " + " | ".join(f"![{t}]({grids[n]})" for n, t in zip(names, titles)) + " |", ""]


def analyses_section(analyses: dict) -> list[str]:
    sets = {n: analyses["sets"][n] for n in _ordered(analyses["sets"])}
    network = NETWORK_TITLES.get(analyses["network"], analyses["network"])
    lines = ["## Analyses", "", f"Classifier {network}, {_recipe(analyses['recipe'])}.", ""]

    cross = {n: r["cross_increment"] for n, r in sets.items() if "cross_increment" in r}
    if cross:
        lines += ["### Cross-increment accuracy (%)", "",
                  "Trained on one increment, tested on the synthetic images of each increment; "
                  "a low off-diagonal mean means the increments teach different things.", "",
                  "| Set | increments | off-diagonal mean | diagonal mean |", "|---|---|---|---|"]
        for n, r in cross.items():
            off = f"{r['off_diagonal_mean']:.1f}" if r["off_diagonal_mean"] is not None else "–"
            lines.append(f"| {_title(n)} | {len(r['increments'])} | {off} | {r['diagonal_mean']:.1f} |")
        lines += [""] + [f"![{_title(n)} cross-increment matrix]({r['plot']})" for n, r in cross.items()] + [""]

    dynamics = {n: r["dynamics"] for n, r in sets.items() if "dynamics" in r}
    if dynamics:
        lines += ["### Training dynamics", "",
                  "One classifier, increments added one at a time "
                  "(real test top-1 % at the end of each increment, and the gain of each new one).", "",
                  "| Set | epochs per increment | accuracy after each increment | gains |", "|---|---|---|---|"]
        for n, r in dynamics.items():
            accs = " → ".join(f"{a:.1f}" for a in r["final_accuracy"])
            gains = " / ".join(f"{g:+.1f}" for g in r["gains"]) or "–"
            lines.append(f"| {_title(n)} | {r['epochs_per_increment']} | {accs} | {gains} |")
        if analyses.get("dynamics_plot"):
            lines += ["", f"![training dynamics]({analyses['dynamics_plot']})"]
        lines.append("")

    carto = {n: r["cartography"] for n, r in sets.items() if "cartography" in r}
    if carto:
        t = next(iter(carto.values()))["thresholds"]
        lines += ["### Data cartography", "",
                  f"Per sample, the mean (confidence) and std (variability) of its true-class probability over "
                  f"training. Easy: confidence ≥ {t['easy']} and variability < {t['variable']}; hard: confidence "
                  f"≤ {t['hard']} and variability < {t['variable']}; ambiguous (informative): the rest.", "",
                  "| Set | epochs | easy | ambiguous | hard |", "|---|---|---|---|---|"]
        for n, r in carto.items():
            s = r["shares"]
            lines.append(f"| {_title(n)} | {r['epochs']} | {s['easy']:.1%} | {s['ambiguous']:.1%} | {s['hard']:.1%} |")
        lines += [""] + [f"![{_title(n)} data cartography]({r['plot']})" for n, r in carto.items()] + [""]
    return lines


def write_report(run: str | Path) -> Path:
    """Write RUN/eval/report.md (atomically) and return its path."""
    eval_dir = Path(run) / "eval"
    lines = [f"# Evaluation report: {Path(run).resolve().name}", ""]
    results, analyses = eval_dir / "results.json", eval_dir / "analyses.json"
    if results.is_file():
        lines += accuracy_section(read_json(results))
    if analyses.is_file():
        lines += analyses_section(read_json(analyses))
    if not (results.is_file() or analyses.is_file()):
        lines += ["Nothing evaluated yet: run `lgd evaluate` or `lgd analyze` on this run directory.", ""]
    path = eval_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
