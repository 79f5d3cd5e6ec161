"""The paper's analyses of a distilled set (docs/method.md §9), with their plots.

- Cross-increment matrix: M[a][b] = top-1 (%) on the synthetic images of increment b of a
  classifier trained on increment a only. The diagonal is accuracy on the training increment
  itself; the off-diagonal mean measures redundancy (high: increments teach the same thing).
- Training dynamics: one classifier trained while increments are added one at a time, a
  fixed number of epochs per increment (each increment restarts the recipe: a fresh
  optimiser and LR schedule on the grown set, the weights carry over); real test accuracy
  and training loss per epoch, and the gain of each new increment (final accuracy with it
  minus final accuracy without it).
- Data cartography (Swayamdipta et al. 2020): train on the whole set and record every
  sample's true-class probability after each epoch; confidence = its mean, variability =
  its standard deviation. Regions (this project's thresholds, arguments below):
    easy       confidence >= 0.75 and variability < 0.2
    hard       confidence <= 0.25 and variability < 0.2
    ambiguous  everything else (middling confidence or high variability): the
               "informative" samples
  so the three shares always sum to 1.

A baseline made in one go (a single stage) is split into increments by slot order within
each class, `stages.increment` images per class each -- how the paper splits a DiT IPC-50 set.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from lgd.classifiers import ClassifierFactory
from lgd.config import Config, TrainSection
from lgd.errors import ConfigError
from lgd.assessment.accuracy import (
    SET_TITLES,
    fingerprint,
    images_per_class,
    load_image_sets,
    materialise,
)
from lgd.files import atomic_path, read_json, write_json
from lgd.progress import progress_bar
from lgd.rundir import SyntheticSet
from lgd.seeding import derive_seed
from lgd.training import Member, accuracy, default_epochs, train_classifier, train_classifiers

ANALYSES = ("cross", "dynamics", "cartography")
EASY, HARD, VARIABLE = 0.75, 0.25, 0.2
ModelFactory = Callable[[int], nn.Module]  # seed -> fresh classifier


def increment_ids(synthetic: SyntheticSet, increment: int) -> torch.Tensor:
    """1-based increment of every image: its stage, or for a single-stage set its rank
    within its class // increment + 1 (load_synthetic returns each class in slot order)."""
    if len(torch.unique(synthetic.increments)) > 1:
        return synthetic.increments.clone()
    rank = torch.zeros_like(synthetic.labels)
    for c in torch.unique(synthetic.labels):
        idx = (synthetic.labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    return rank // increment + 1


def _percent(model: nn.Module, images, labels, device) -> float:
    return 100 * accuracy(model, (images, labels), device)


def cross_increment_matrix(
    images: torch.Tensor, labels: torch.Tensor, increments: torch.Tensor, make_model: ModelFactory,
    section: TrainSection, *, seed: int = 0, device="cpu", progress: bool = True,
) -> dict:
    """K x K matrix (rows: trained on, columns: tested on), in percent."""
    ks = sorted(torch.unique(increments).tolist())
    members = [Member(make_model(derive_seed(seed, "cross", a)), (images[increments == a], labels[increments == a]),
                      derive_seed(seed, "cross", a)) for a in ks]
    sizes = {len(m.data[1]) for m in members}
    # One group when the increments are of one size (the usual case), else one training each.
    limit = section.group_size or (len(members) if len(sizes) == 1 else 1)
    for start in progress_bar(range(0, len(members), limit), desc="cross-increment", unit="group", disable=not progress):
        train_classifiers(members[start : start + limit], section, device=device, progress=progress)
    tests = [(images[increments == b], labels[increments == b]) for b in ks]
    matrix = [[_percent(m.model, *test, device) for test in tests] for m in members]
    m = torch.tensor(matrix, dtype=torch.float64)
    off = ~torch.eye(len(ks), dtype=torch.bool)
    return {
        "increments": ks,
        "matrix": matrix,
        "diagonal_mean": float(m.diagonal().mean()),
        "off_diagonal_mean": float(m[off].mean()) if len(ks) > 1 else None,
    }


def training_dynamics(
    images: torch.Tensor, labels: torch.Tensor, increments: torch.Tensor, make_model: ModelFactory,
    section: TrainSection, test_data, *, epochs_per_increment: int, eval_every: int = 1,
    seed: int = 0, device="cpu", progress: bool = True,
) -> dict:
    """Accuracy (%) and loss per epoch while increments 1, 1-2, 1-3, ... are trained on."""
    ks = sorted(torch.unique(increments).tolist())
    phase = dataclasses.replace(section, epochs=epochs_per_increment)
    model = make_model(derive_seed(seed, "dynamics"))
    out = {"increments": ks, "epochs_per_increment": epochs_per_increment, "loss": [], "test_epochs": [],
           "accuracy": [], "final_accuracy": []}
    for i, k in enumerate(progress_bar(ks, desc="dynamics", unit="increment", disable=not progress)):
        mask = increments <= k
        history = train_classifier(model, (images[mask], labels[mask]), phase,
                                   seed=derive_seed(seed, "dynamics", k), device=device, eval_data=test_data,
                                   eval_every=eval_every, progress=progress)
        out["loss"] += history.loss
        out["test_epochs"] += [i * epochs_per_increment + e for e in history.test_epochs]
        out["accuracy"] += [100 * a for a in history.test_accuracy]
        out["final_accuracy"].append(100 * history.test_accuracy[-1])
    final = out["final_accuracy"]
    out["gains"] = [b - a for a, b in zip(final, final[1:])]
    return out


def cartography_regions(confidence: torch.Tensor, variability: torch.Tensor, easy: float = EASY,
                        hard: float = HARD, variable: float = VARIABLE) -> list[str]:
    """"easy" / "ambiguous" / "hard" per sample (thresholds in the module docstring)."""
    steady = variability < variable
    return ["easy" if s and c >= easy else "hard" if s and c <= hard else "ambiguous"
            for c, s in zip(confidence.tolist(), steady.tolist())]


def cartography_shares(regions: list[str]) -> dict[str, float]:
    n = max(len(regions), 1)
    return {r: regions.count(r) / n for r in ("easy", "ambiguous", "hard")}


def data_cartography(
    images: torch.Tensor, labels: torch.Tensor, increments: torch.Tensor, make_model: ModelFactory,
    section: TrainSection, *, seed: int = 0, device="cpu", progress: bool = True,
) -> dict:
    """Per-sample confidence / variability over training on the whole set, and region shares
    overall and per increment."""
    model = make_model(derive_seed(seed, "cartography"))
    history = train_classifier(model, (images, labels), section,
                               seed=derive_seed(seed, "cartography"), device=device, track=(images, labels),
                               progress=progress)
    confidence = history.confidence.mean(0)
    variability = history.confidence.std(0, unbiased=False)
    regions = cartography_regions(confidence, variability)
    ks = sorted(torch.unique(increments).tolist())
    return {
        "thresholds": {"easy": EASY, "hard": HARD, "variable": VARIABLE},
        "epochs": history.epochs,
        "shares": cartography_shares(regions),
        "shares_per_increment": {str(k): cartography_shares([r for r, i in zip(regions, increments.tolist()) if i == k])
                                 for k in ks},
        "confidence": confidence.tolist(),
        "variability": variability.tolist(),
        "label": labels.tolist(),
        "increment": increments.tolist(),
    }


# ------------------------------------------------------------------ plots


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_cross_increment(result: dict, path: Path, title: str) -> None:
    ks, m = result["increments"], result["matrix"]
    fig = Figure(figsize=(1.0 + 0.8 * len(ks), 0.8 + 0.8 * len(ks)))
    ax = fig.subplots()
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    for a in range(len(ks)):
        for b in range(len(ks)):
            ax.text(b, a, f"{m[a][b]:.0f}", ha="center", va="center", color="white" if m[a][b] < 60 else "black",
                    fontsize=8)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("tested on increment")
    ax.set_ylabel("trained on increment")
    off = result["off_diagonal_mean"]
    ax.set_title(f"{title}: off-diagonal mean {off:.1f}%" if off is not None else title, fontsize=9)
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    _save(fig, path)


def plot_dynamics(results: dict[str, dict], path: Path) -> None:
    """Accuracy and loss per epoch for every set; dotted lines where an increment is added."""
    fig = Figure(figsize=(9, 3.5))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for name, r in results.items():
        acc_ax.plot(r["test_epochs"], r["accuracy"], label=SET_TITLES.get(name, name))
        loss_ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=SET_TITLES.get(name, name))
    for r in list(results.values())[:1]:
        for i in range(1, len(r["increments"])):
            for ax in (acc_ax, loss_ax):
                ax.axvline(i * r["epochs_per_increment"] + 0.5, color="grey", linestyle=":", linewidth=0.8)
    acc_ax.set(xlabel="epoch", ylabel="real test top-1 (%)", title="accuracy while adding increments")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    acc_ax.legend(fontsize=8)
    _save(fig, path)


def plot_cartography(result: dict, path: Path, title: str) -> None:
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    sc = ax.scatter(result["variability"], result["confidence"], c=result["increment"], s=8, cmap="viridis")
    t = result["thresholds"]
    ax.axhline(t["easy"], color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(t["hard"], color="grey", linestyle=":", linewidth=0.8)
    ax.axvline(t["variable"], color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="variability (std of p(true class))", ylabel="confidence (mean of p(true class))",
           xlim=(0, 0.5), ylim=(0, 1))
    s = result["shares"]
    ax.set_title(f"{title}: easy {s['easy']:.0%}, ambiguous {s['ambiguous']:.0%}, hard {s['hard']:.0%}", fontsize=9)
    fig.colorbar(sc, ax=ax, label="increment", ticks=sorted(set(result["increment"])))
    _save(fig, path)


# ------------------------------------------------------------------ a run directory


def analyze_run(
    run: str | Path,
    config: Config,
    *,
    sets: list[str] | None = None,
    network: str | None = None,
    analyses: list[str] | None = None,
    epochs: int | None = None,
    dynamics_epochs: int | None = None,
    eval_every: int = 1,
    device: str | torch.device = "cpu",
    test_data=None,
    model_overrides: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run the analyses on each available set and merge them into RUN/eval/analyses.json
    (earlier results of other sets / analyses are kept); plots go next to it. Each result is
    written as it finishes with a signature of what it depends on; a rerun keeps the results
    whose signature still matches and computes only the others.

    epochs: training epochs for cross-increment and cartography (default: the eval recipe's,
    by IPC). dynamics_epochs: epochs per increment (default: the recipe's epochs for the
    whole set divided by the number of increments).
    """
    run = Path(run)
    analyses = list(analyses or ANALYSES)
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ConfigError(f"unknown analysis {unknown}; choose from {', '.join(ANALYSES)}")
    for value, what in ((epochs, "epochs"), (dynamics_epochs, "dynamics epochs"), (eval_every, "eval_every")):
        if value is not None and value < 1:
            raise ConfigError(f"{what} must be at least 1, got {value}")
    network = network or config.eval.networks[0]
    section = dataclasses.replace(config.eval.recipe, epochs=epochs or config.eval.recipe.epochs)
    device = torch.device(device)
    size = config.data.classifier_input
    synthetic, skipped = load_image_sets(run, sets or ["lgd", "dit", "igd"])
    if not synthetic:
        raise ConfigError(f"{run} holds none of the image sets {sets or ['lgd', 'dit', 'igd']}: " + "; ".join(skipped.values()))

    test = None
    if "dynamics" in analyses:
        if test_data is None:
            from lgd.data.splits import load_split

            test_data = load_split(config.data, "test")
        test = materialise(test_data, crop=size, progress=progress)

    out_dir = run / "eval"
    path = out_dir / "analyses.json"
    report = read_json(path) if path.is_file() else {"sets": {}}
    report.update(network=network, recipe=dataclasses.asdict(section), skipped=skipped)
    for name, s in synthetic.items():
        increments = increment_ids(s, config.stages.increment)
        num_classes = int(test[1].max()) + 1 if test is not None else int(s.labels.max()) + 1
        factory = ClassifierFactory(s.images.shape[1], num_classes, size, model_overrides or config.eval.recipe.model_overrides())
        make = lambda seed: factory(network, seed)  # noqa: E731
        seed = derive_seed(config.seed, "analysis", name)
        common = dict(seed=seed, device=device, progress=progress)
        done = report["sets"].setdefault(name, {})
        k = len(torch.unique(increments))
        per = dynamics_epochs or max(1, (section.epochs or default_epochs(section.recipe, images_per_class(s.labels))) // k)
        # What each result depends on: a rerun of the same command keeps a result whose
        # signature matches (so a killed analyze resumes after its last finished analysis).
        basis = {"network": network, "recipe": dataclasses.asdict(section), "classifier_size": size, "seed": seed,
                 "images": len(s.labels), "fingerprint": fingerprint(s.images, s.labels),
                 "model": model_overrides or config.eval.recipe.model_overrides()}
        signatures = {"cross_increment": basis, "cartography": basis,
                      "dynamics": {**basis, "epochs_per_increment": per, "eval_every": eval_every,
                                   "test_images": len(test[1]) if test is not None else None}}
        fresh = lambda key: done.get(key, {}).get("signature") != signatures[key]  # noqa: E731
        if "cross" in analyses and fresh("cross_increment"):
            done["cross_increment"] = cross_increment_matrix(s.images, s.labels, increments, make, section, **common)
            done["cross_increment"].update(plot=f"cross_increment_{name}.png", signature=signatures["cross_increment"])
            plot_cross_increment(done["cross_increment"], out_dir / f"cross_increment_{name}.png", SET_TITLES[name])
            write_json(path, report)
        if "dynamics" in analyses and fresh("dynamics"):
            done["dynamics"] = training_dynamics(s.images, s.labels, increments, make, section, test,
                                                 epochs_per_increment=per, eval_every=eval_every, **common)
            done["dynamics"]["signature"] = signatures["dynamics"]
            write_json(path, report)
        if "cartography" in analyses and fresh("cartography"):
            done["cartography"] = data_cartography(s.images, s.labels, increments, make, section, **common)
            done["cartography"].update(plot=f"cartography_{name}.png", signature=signatures["cartography"])
            plot_cartography(done["cartography"], out_dir / f"cartography_{name}.png", SET_TITLES[name])
            write_json(path, report)
    dynamics = {n: r["dynamics"] for n, r in report["sets"].items() if "dynamics" in r}
    if dynamics:
        plot_dynamics(dynamics, out_dir / "dynamics.png")
        report["dynamics_plot"] = "dynamics.png"
    write_json(path, report)
    return report
