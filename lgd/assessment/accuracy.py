"""The evaluation protocol (docs/method.md §7): train from scratch on an image set, test on real data.

For each network and each image set -- the run's distilled set ("lgd"), baseline sets under
RUN/baselines/<name>/ in the same layout ("dit", "igd"), and "random" (a random real subset
of the same IPC) -- train `runs` classifiers from scratch with the config's eval recipe
(seeds differ per run, are shared across sets so sets are compared on equal initialisations)
and report the mean and (population) standard deviation of top-1 accuracy, in percent, on the
real test split. The Random baseline draws a fresh subset for every run, so its spread
includes the choice of images. Results go to RUN/eval/results.json, rewritten atomically after
each group of trainings so a long evaluation leaves usable partial results.

Resume: every finished training is recorded atomically in RUN/eval/trainings/ with what its
accuracy depends on (network, set, run, seed, recipe, sizes, a fingerprint of the images); the
same command run again reuses the records that still match and trains only the rest, so a
killed evaluation loses at most the trainings in flight and ends with the same results.json.

Groups: trainings of one network on sets of equal size are trained together
(lgd.training.train_classifiers; eval.recipe.group_size members at most, by default one at a
time on CPU and as many as memory holds with vmap stacking on a GPU) and scored in one pass
over the test set.

Two accuracies per training: the last epoch's (the headline, honest number) and the best of
`eval.periodic_tests` test evaluations spread over training (every epochs // N epochs; the
IGD / Minimax scripts evaluate 100 times and report the best). The best is selected on the
test set itself, so it is reported under its own name, "best-epoch (test-selected, as in
IGD/Minimax)", never as the result.

Test view (`eval.test_view`): "resize" loads the real test images at the classifier size
(the shorter side resized, then centre-cropped: Minimax/IDC's Resize(224) + CenterCrop(224));
"crop" loads them at data.image_size and centre-crops the classifier size (resize 256, crop
224). Training images are resized to the classifier size either way.

On several processes (a Runtime of world > 1) the groups of trainings are dealt round-robin
over the ranks, one round of `world` groups at a time; the accuracies are
gathered after each round and the main process writes. A training's seed depends only on the
network and the run, so the table is that of one process. With eval.recipe.distributed the
ranks instead train each model together (DDP), one after the other.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from lgd.assessment.grids import write_grids
from lgd.classifiers import ClassifierFactory, canonical_name
from lgd.config import Config, load_config
from lgd.errors import ConfigError, DamagedFileError, DataError
from lgd.files import read_json, write_json
from lgd.progress import progress_bar
from lgd.rundir import RunDir, SyntheticSet, load_synthetic
from lgd.runtime import machine
from lgd.seeding import derive_seed
from lgd.training import Member, accuracies, train_classifiers
from lgd.training.recipes import batch_size_of, default_epochs
from lgd.training.fast import default_group_size

if TYPE_CHECKING:
    from lgd.runtime import Runtime

log = logging.getLogger(__name__)

SET_ORDER = ("random", "dit", "igd", "lgd")  # report column order
SET_TITLES = {"random": "Random", "dit": "DiT", "igd": "IGD", "lgd": "LGD"}


def load_run_config(run: str | Path, overrides: list[str] | None = None) -> Config:
    """RUN/config.yaml, validated, with `eval.key=value` overrides (how to evaluate; the fields
    that define the images are the run's and cannot be overridden here). Evaluation never
    loads the generator, so its weights need not exist on this machine."""
    run = Path(run)
    for item in overrides or []:
        if not item.startswith("eval."):
            raise ConfigError(f"override {item!r}: only eval.* fields can be changed for an evaluation "
                              "(e.g. eval.recipe.engine=reference eval.runs=3)")
    if not run.is_dir():
        raise ConfigError(f"run directory {run} does not exist")
    path = run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {run} is not a run directory (lgd distill writes config.yaml first)")
    return load_config(path, overrides)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if size > min(h, w):
        return images  # smaller than the classifier: the classifier resizes it up instead
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def materialise(dataset, crop: int | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset as in-memory (uint8 images, labels), centre-cropped to `crop`: scored many
    times, a folder dataset would otherwise be decoded from disk for every classifier."""
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        images, labels = images, dataset.labels
    else:
        loader = DataLoader(dataset, batch_size=64, num_workers=min(8, os.cpu_count() or 1))
        chunks = [(_to_uint8(center_crop(x, crop) if crop else x), y)
                  for x, y in progress_bar(loader, desc="loading test images", unit="batch", leave=False, disable=not progress)]
        if not chunks:
            raise DataError("the real test split is empty")
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]).long()
    return (center_crop(images, crop) if crop else images), labels.long()


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else (x * 255).round().clamp(0, 255).to(torch.uint8)


def _num_classes(data) -> int:
    n = getattr(data, "num_classes", None)
    return int(n) if n is not None else int(data[1].max()) + 1


def images_per_class(labels: torch.Tensor) -> int:
    return int(torch.bincount(labels).max())


def load_image_sets(run: str | Path, names: list[str]) -> tuple[dict[str, SyntheticSet], dict[str, str]]:
    """The stored sets among `names` ("lgd" and baselines; not "random") and, for each one
    that is missing, the reason."""
    run = Path(run)
    found, skipped = {}, {}
    for name in names:
        root = run if name == "lgd" else run / "baselines" / name
        if name != "lgd" and not root.is_dir():
            skipped[name] = f"{root} not found"
            continue
        try:
            found[name] = load_synthetic(root)
        except DamagedFileError:
            raise  # a damaged set is reported, never skipped
        except DataError as exc:
            skipped[name] = str(exc)
    return found, skipped


def random_subset(train_data, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` random real images per class (float [0, 1]), drawn with lgd.data.per_class_subset."""
    from lgd.data import per_class_subset

    indices = per_class_subset(train_data, ipc, torch.Generator().manual_seed(seed))
    images = getattr(train_data, "images", None)
    if isinstance(images, torch.Tensor):
        chosen = images[indices]
        return (chosen.float() / 255 if chosen.dtype == torch.uint8 else chosen.float()), train_data.labels[indices]
    pairs = [train_data[int(i)] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


TRAININGS = "trainings"  # RUN/eval/trainings/<network>-<set>-run<r>.json: one finished training each


def training_path(run: Path, job: tuple[str, str, int]) -> Path:
    network, name, r = job
    return run / "eval" / TRAININGS / f"{network}-{name}-run{r}.json"


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> float:
    """A cheap content check of an image set, recorded with results that depend on it."""
    return float(images.double().sum()) + float(labels.double().sum())


def finished_trainings(run: Path, signatures: dict) -> dict:
    """The records of the trainings already made with exactly these signatures (a changed
    recipe, set, test split or protocol makes a record stale: it is retrained and overwritten)."""
    done = {}
    for job, sig in signatures.items():
        path = training_path(run, job)
        if path.is_file():
            record = read_json(path)
            if {k: record.get(k) for k in sig} == sig and "accuracy" in record:
                done[job] = record
    return done


def training_groups(jobs: list, limit_of, size_of) -> list[list]:
    """Jobs cut into groups trained together: same network and number of images, in job order,
    at most limit_of(network) each. The groups depend only on the jobs and the limits, never
    on the number of processes."""
    groups: dict[tuple, list[list]] = {}
    order: list[list] = []
    for job in jobs:
        limit = limit_of(job[0])
        key = (job[0], size_of(job))
        open_groups = groups.setdefault(key, [])
        if not open_groups or len(open_groups[-1]) >= limit:
            open_groups.append([])
            order.append(open_groups[-1])
        open_groups[-1].append(job)
    return order


def accuracy_cells(scores: dict, networks: list[str], sets: list[str], runs: int) -> dict:
    """{network: {set: mean, std, runs}} for every (network, set) whose runs are all scored."""
    cells: dict = {}
    for network in networks:
        for name in sets:
            if all((network, name, r) in scores for r in range(runs)):
                cell = [scores[(network, name, r)] for r in range(runs)]
                t = torch.tensor(cell, dtype=torch.float64)
                cells.setdefault(network, {})[name] = {
                    "mean": float(t.mean()), "std": float(t.std(unbiased=False)), "runs": cell}
    return cells


class ClassSubset(nn.Module):
    """A teacher's logits at the dataset's classes (a 1000-class ImageNet teacher on a subset)."""

    def __init__(self, teacher: nn.Module, classes: list[int]):
        super().__init__()
        self.teacher = teacher
        self.register_buffer("classes", torch.tensor(classes), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)[:, self.classes]


def load_teacher(run: Path, config: Config, dataset, num_classes: int, device: torch.device) -> tuple[nn.Module, dict]:
    """The soft_label recipe's teacher (eval.teacher) in eval mode, and what identifies it in the
    training records (its source and a fingerprint of its weights)."""
    from lgd.checkpoints import load_classifier
    from lgd.classifiers.torchvision_resnet import load_torchvision_resnet18
    from lgd.data import model_class_map

    name = config.eval.teacher
    path = run / "models" / "reference.safetensors" if name == "reference" else Path(name)
    if not path.is_file():
        what = "the run's reference model (lgd distill trains it when stages.ipc > stages.increment)" \
            if name == "reference" else "eval.teacher"
        raise ConfigError(f"{path} not found: {what} is the soft_label recipe's teacher")
    if path.suffix == ".safetensors":
        model, meta = load_classifier(path, device)
        outputs = meta["spec"]["num_classes"]
    else:
        model = load_torchvision_resnet18(path, device)
        outputs = model.fc.out_features
    if outputs != num_classes:
        model = ClassSubset(model, model_class_map(dataset, outputs, f"the teacher {name}")).to(device)
    weights = sum(float(t.double().sum()) for t in model.state_dict().values())
    return model.eval().requires_grad_(False), {"source": str(name), "fingerprint": weights}


def tabulate(results: dict, scores: dict, best: dict, networks: list[str], sets: list[str], runs: int) -> None:
    """results' tables: "accuracy" (last epoch) and, with periodic tests, "best_epoch_accuracy"."""
    results["accuracy"] = accuracy_cells(scores, networks, sets, runs)
    if results["protocol"]["periodic_tests"]:
        results["best_epoch_accuracy"] = accuracy_cells(best, networks, sets, runs)


def check_finished(run: Path, partial: bool) -> None:
    """`lgd evaluate` / `lgd analyze` need a finished run (done.json), unless told `partial`,
    and at least one image either way."""
    if RunDir(run).busy():
        raise ConfigError(f"{run} is being written by a running lgd distill (it holds {run / '.lock'}): "
                          "wait for it to finish")
    if not (run / "done.json").is_file() and not partial:
        raise ConfigError(f"{run} is not a finished run (no done.json): finish it with the same `lgd distill` "
                          "command, or pass --partial to evaluate the images there so far")
    if not any((run / "records").rglob("*.json")):
        raise DataError(f"{run} holds no finished image (records/ is empty): nothing to evaluate")


def wanted_sets(config: Config, sets: list[str] | None) -> list[str]:
    names = sets if sets is not None else ["lgd", *config.eval.baselines]
    unknown = sorted(set(names) - set(SET_ORDER))
    if unknown:
        raise ConfigError(f"unknown image set(s) {unknown}; choose from {', '.join(SET_ORDER)}")
    return [n for n in SET_ORDER if n in names]


def evaluate_run(
    run: str | Path,
    config: Config,
    *,
    networks: list[str] | None = None,
    runs: int | None = None,
    epochs: int | None = None,
    sets: list[str] | None = None,
    device: str | torch.device = "cpu",
    train_data=None,
    test_data=None,
    model_overrides: dict | None = None,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> dict:
    """Run the protocol and write RUN/eval/results.json (accuracies in percent).

    train_data / test_data default to the config's dataset (needed: test always, train only
    for the Random baseline); model_overrides go to build_classifier (tiny test networks).
    runtime: the processes to share the trainings among (every rank calls this with the same
    arguments and gets the whole results; the main process writes); None: this process alone.
    """
    run = Path(run)
    world = runtime.world if runtime is not None else 1
    writer = runtime is None or runtime.is_main  # the one process that writes and shows progress
    progress = progress and writer
    networks = [canonical_name(n) for n in (networks or config.eval.networks)]
    runs = config.eval.runs if runs is None else runs
    if runs < 1 or (epochs is not None and epochs < 1):
        raise ConfigError(f"runs and epochs must be at least 1, got runs={runs}, epochs={epochs}")
    section = dataclasses.replace(config.eval.recipe, epochs=epochs or config.eval.recipe.epochs)
    names = wanted_sets(config, sets)
    device = torch.device(device)
    size = config.data.classifier_input

    synthetic, skipped = load_image_sets(run, [n for n in names if n != "random"])
    for name, reason in skipped.items() if writer else ():
        log.warning("skipping the %s set: %s", SET_TITLES[name], reason)
    ipc = images_per_class(synthetic["lgd"].labels) if "lgd" in synthetic else config.stages.ipc
    view = config.eval.test_view
    if test_data is None:
        from lgd.data.splits import load_split

        test_data = load_split(config.data, "test", size if view == "resize" else config.data.image_size)
    if "random" in names and train_data is None:
        from lgd.data.splits import load_split

        train_data = load_split(config.data, "train")
    num_classes = _num_classes(test_data)
    test = materialise(test_data, crop=size, progress=progress)  # a no-op crop when loaded at `size`
    teacher, teacher_info = None, None
    if section.recipe == "soft_label":
        teacher, teacher_info = load_teacher(run, config, test_data, num_classes, device)
    factory = ClassifierFactory(test[0].shape[1], num_classes, size, model_overrides or config.eval.recipe.model_overrides())

    def images_of(name: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "random":
            return random_subset(train_data, ipc, derive_seed(config.seed, "eval-random", r))
        return synthetic[name].images, synthetic[name].labels

    available = [n for n in names if n == "random" or n in synthetic]
    periodic = config.eval.periodic_tests
    eval_every = max(1, (section.epochs or default_epochs(section.recipe, ipc)) // periodic) if periodic else None
    results = {
        "dataset": config.data.name,
        "classifier_size": size,
        "recipe": {**dataclasses.asdict(section), "batch_size": batch_size_of(section)},  # as trained
        "protocol": {"reported": "last epoch", "periodic_tests": periodic, "eval_every": eval_every,
                     "test_view": view, "teacher": config.eval.teacher if section.recipe == "soft_label" else None},
        "runs": runs,
        "scored_on": config.data.evaluate_on,  # test, or the validation part of the training split
        "test_images": len(test[1]),
        "sets": {n: {"images": len(synthetic[n]) if n in synthetic else ipc * num_classes,
                     "ipc": images_per_class(synthetic[n].labels) if n in synthetic else ipc} for n in available},
        "skipped": skipped,
        "machine": machine(),  # where the trainings ran: another CPU computes other last bits
        "accuracy": {},
    }
    out = run / "eval" / "results.json"
    together = section.distributed and world > 1  # each model trained by all ranks (DDP)
    jobs = [(network, name, r) for network in networks for name in available for r in range(runs)]

    @functools.cache
    def contents(name: str, r: int) -> tuple[int, float]:
        images, labels = images_of(name, r)
        return len(labels), fingerprint(images, labels)

    def signature(job: tuple[str, str, int]) -> dict:
        """Everything a finished training's accuracy depends on: a record is reused only if equal."""
        network, name, r = job
        count, check = contents(name, r if name == "random" else 0)  # a stored set is the same for every run
        return {"network": network, "set": name, "run": r, "seed": derive_seed(config.seed, "eval", network, r),
                "recipe": dataclasses.asdict(section), "classifier_size": size, "model": factory.overrides,
                "test_images": len(test[1]), "test_view": view, "periodic_tests": periodic,
                "teacher": teacher_info, "images": count, "fingerprint": check}

    signatures = {job: signature(job) for job in jobs}
    records = finished_trainings(run, signatures)
    scores = {job: r["accuracy"] for job, r in records.items()}
    best = {job: r["best_accuracy"] for job, r in records.items() if "best_accuracy" in r}
    if scores and writer:
        log.info("reusing %d finished training(s) from %s", len(scores), run / "eval" / TRAININGS)

    @functools.cache
    def group_limit(network: str) -> int:
        if section.group_size:
            return section.group_size
        batch = min(batch_size_of(section), ipc * num_classes)
        sample = test[0][:1].to(device)
        sample = sample.float() / 255 if sample.dtype == torch.uint8 else sample.float()
        return default_group_size(section, device, factory(network, 0).to(device), sample, batch)

    groups = training_groups([j for j in jobs if j not in scores], group_limit,
                             size_of=lambda job: signatures[job]["images"])
    bar = progress_bar(total=len(jobs), initial=len(scores), desc="evaluate", unit="model", disable=not progress)

    def train_group(group: list[tuple[str, str, int]]) -> list[tuple[tuple[str, str, int], dict]]:
        """Train the group's classifiers from scratch (one training per job), score them together:
        per job the record of its accuracies (last epoch, and the periodic test evaluations)."""
        network = group[0][0]
        bar.set_postfix_str(f"{network} " + ", ".join(f"{SET_TITLES[n]} run {r + 1}/{runs}" for _, n, r in group))
        members = [Member(factory(network, signatures[job]["seed"]), images_of(job[1], job[2]), signatures[job]["seed"])
                   for job in group]
        histories = train_classifiers(members, section, device=device, progress=progress,
                                      runtime=runtime if together else None, teacher=teacher,
                                      eval_data=test if periodic else None, eval_every=eval_every or 1)
        scored = accuracies([m.model for m in members], test, device)
        out = []
        for job, last, history in zip(group, scored, histories):
            record = {"accuracy": 100 * last}
            if periodic:
                curve = [100 * a for a in history.test_accuracy]
                record.update(best_accuracy=max(curve), test_epochs=history.test_epochs, test_accuracy=curve)
            out.append((job, record))
        return out

    split = world > 1 and not together  # rounds of `world` groups, one per rank
    stride = world if split else 1
    for start in range(0, len(groups), stride):
        batch = groups[start : start + stride]
        mine = batch[runtime.rank : runtime.rank + 1] if split else batch
        done = [item for group in mine for item in train_group(group)]
        done = runtime.gather(done) if split else done
        for job, record in done:
            scores[job] = record["accuracy"]
            if "best_accuracy" in record:
                best[job] = record["best_accuracy"]
        bar.update(len(done))
        if writer:
            for job, record in done:
                write_json(training_path(run, job), {**signatures[job], **record})
            tabulate(results, scores, best, networks, available, runs)
            write_json(out, results)
    tabulate(results, scores, best, networks, available, runs)
    bar.close()
    if writer:
        shown = {name: images_of(name, 0) for name in available}
        results["grids"] = write_grids(run / "eval", {**shown, "real": test})
        write_json(out, results)
    return results
