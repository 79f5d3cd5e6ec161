"""The LGD distillation run (docs/method.md §3): seed increment, then learnability-guided stages.

    D_1 = seed increment (IGD, plain DiT or random real)
    theta* = reference classifier trained on the real data
    for stage k = 2 .. K:
        theta_{k-1} = classifier trained from scratch on D_{k-1}
        for each class and new slot: kappa learnability-guided candidates, keep the top S
    plus the evaluation baselines (plain DiT and IGD sets of the full IPC).

Work runs in rounds: the next `sampling.round_slots` slots of every class, all their
candidates, cut into batches of whole kappa-groups. Everything a batch does depends only on
its seeds and on the class memory before the round, so a resumed run recomputes an
interrupted batch bit for bit and skips finished ones. The memory is updated after each
round; with the default of one slot per round every image sees all earlier images of its
class, as in the papers' code (which makes one image at a time), while the batch spans classes.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lgd.acceleration import apply_speedups, tf32
from lgd.checkpoints import load_classifier, save_classifier
from lgd.classifiers import build_classifier
from lgd.config import Config, TrainSection
from lgd.data import load_dataset, model_class_map, per_class_subset
from lgd.errors import ConfigError, LgdError
from lgd.guidance import (
    ClassMemory,
    Deviation,
    InfluenceGuidance,
    InfluenceLoss,
    LearnabilityGuidance,
    learnability,
    select_checkpoints,
    top1_per_group,
)
from lgd.guidance.common import to_classifier_input
from lgd.kernels.policy import kernel_mode, resolve_mode
from lgd.files import atomic_path, write_json, write_png, write_tensors
from lgd.models import load_dit
from lgd.models.vae import IdentityCodec, load_vae
from lgd.rundir import image_name, latent_name, load_synthetic, record_name
from lgd.runtime import Runtime
from lgd.sampling import Guidance, Sampler, SamplerSettings
from lgd.seeding import NoiseStream, derive_seed
from lgd.training import train_classifier

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_REDRAWS = 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available")
    return device


@dataclass
class Generator:
    """The generative side: DiT, latent codec and the sampling loop."""

    dit: torch.nn.Module
    codec: torch.nn.Module
    sampler: Sampler

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.sampler.diffusion.alphas_cumprod


def load_generator(config: Config, device: torch.device) -> Generator:
    from lgd.demo.models import demo_paths

    def path(kind: str, value: str):
        return demo_paths()[kind] if value == "demo" else value

    dit = load_dit(path("dit", config.model.dit), num_heads=config.model.dit_num_heads, device=device)
    dit.eval().requires_grad_(False).set_attention_backend(config.model.attention)
    if config.model.vae == "identity":
        codec = IdentityCodec(dit.config.in_channels)
    else:
        codec = load_vae(path("vae", config.model.vae), device=device)
    codec.eval().requires_grad_(False)
    if codec.latent_channels != dit.config.in_channels:
        raise ConfigError(f"the VAE makes {codec.latent_channels}-channel latents; the DiT expects {dit.config.in_channels}")
    if dit.config.input_size * codec.downsample != config.data.image_size:
        raise ConfigError(
            f"data.image_size {config.data.image_size} does not match the generator: DiT latents of "
            f"{dit.config.input_size} px x VAE factor {codec.downsample} = {dit.config.input_size * codec.downsample} px"
        )
    s = config.sampling
    if s.engine == "fast":  # speed switches (lgd/acceleration.py); the reference engine stays eager fp32
        apply_speedups(dit, codec, compile=s.compile, precision=s.precision, fp32_guidance=s.fp32_guidance,
                       checkpoint_decoder=s.checkpoint_decoder)
    settings = SamplerSettings(s.steps, s.cfg_scale, s.cfg_channels, s.method, s.eta)
    shape = (dit.config.in_channels, dit.config.input_size, dit.config.input_size)
    return Generator(dit, codec, Sampler(dit, settings, shape))


def read_config_file(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


# Fields a resume may change: they say how to compute, and never touch a finished image.
# sampling.batch_size (the fix after running out of memory) does change the float order, so
# the images still to be made may differ in their last bits from an uninterrupted run's.
RESUMABLE = ("sampling.batch_size", "distributed_timeout")


def claim_run_dir(run: Path, config: Config) -> None:
    """Write the resolved config, or check that a resumed run uses the same one up to the
    RESUMABLE fields; a change to those rewrites config.yaml and is appended to history.jsonl."""
    wanted = config.to_dict()
    path = run / "config.yaml"
    if path.exists():
        try:  # fields added to Config since the run started take their defaults
            found = Config.from_dict(read_config_file(run)).to_dict()
        except ConfigError as exc:
            raise ConfigError(f"{path} does not fit this version of lgd: {exc}") from None
        diff = sorted(_diff(found, wanted))
        refused = [key for key in diff if key not in RESUMABLE]
        if refused:
            raise ConfigError(f"{run} was started with a different config ({', '.join(refused[:5])}); "
                              "use a new --out folder or the same settings")
        log.info("resuming the run in %s", run)
        if not diff:
            return
        changed = {key: [_get(found, key), _get(wanted, key)] for key in diff}
        log.info("this resume changes %s", ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "event": "resume", "changed": changed}
        with open(run / "history.jsonl", "a") as history:
            history.write(json.dumps(entry) + "\n")
    run.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(wanted, sort_keys=False))


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


# Deviation guidance moves x_t by up to gamma/|x_t| per step, about gamma/D of its norm for D
# latent dims; the papers' gammas (LGD 50, IGD 120) on 32x32x4 latents give 1.2 % and 2.9 %.
DEVIATION_SHARE_LIMIT = 0.1


def warn_deviation_scale(config: Config, latent_shape: tuple[int, ...]) -> None:
    """Warn when a gamma would move x_t by a large share of its norm on these latents (the
    papers' gammas on the demo's 8x8x4 latents: 20-47 %, and the images leave their class)."""
    dims = math.prod(latent_shape)
    for name, gamma in (("lgd.gamma", config.lgd.gamma), ("igd.gamma", config.igd.gamma)):
        if gamma / dims > DEVIATION_SHARE_LIMIT:
            log.warning("%s = %g moves x_t by up to %.0f %% of its norm per guided step on %d-dim latents "
                        "(the papers' setting: 1-3 %%); consider %s = %g (scaled by %d/4096)",
                        name, gamma, 100 * gamma / dims, dims, name, gamma * dims / 4096, dims)


@dataclass
class Finished:
    """One kept image, computed by any rank and written by the main process."""

    stage: int
    cls: int
    slot: int
    image: torch.Tensor  # [C, H, W] in [0, 1]
    latent: torch.Tensor
    record: dict


class Distiller:
    """One distillation run into a run directory (see lgd/rundir.py for the layout).

    Rounds are split over the processes batch by batch; results are gathered, the main
    process writes them, and every rank rebuilds the class memory from the written latents.
    Batches are cut the same way for any process count, so the distilled set does not depend
    on it.
    """

    def __init__(self, config: Config, run: str | Path, progress: bool = True):
        self.config = config
        self.run = Path(run)
        self.runtime = Runtime(config.distributed_timeout)
        self.progress = progress and self.runtime.is_main
        self.device = self.runtime.device if config.device == "auto" and self.runtime.world > 1 \
            else resolve_device(config.device)
        self.stages = config.stages.ipc // config.stages.increment

    # --- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        c = self.config
        rt = self.runtime
        if rt.is_main:
            rt.check_writable(self.run)
            rt.lock(self.run)
            claim_run_dir(self.run, c)
        rt.barrier()
        self.generator = load_generator(c, self.device)
        self.train_set = load_dataset(c.data.name, "train", c.data.root, c.data.image_size)
        self.num_classes = self.train_set.num_classes
        self.dit_classes = model_class_map(self.train_set, self.generator.dit.config.num_classes, "the DiT")
        self.channels = self.train_set.channels
        if self.generator.codec.image_channels != self.channels:
            raise ConfigError(f"the generator makes {self.generator.codec.image_channels}-channel images, "
                              f"the dataset has {self.channels}")
        self.classifier_size = c.data.classifier_size or c.data.image_size
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else ((0.5,), (0.5,))
        self.stats = {"mean": list(mean), "std": list(std)}
        if rt.is_main:
            warn_deviation_scale(c, self.generator.sampler.latent_shape)

    def spec(self, section: TrainSection) -> dict:
        """build_classifier's arguments for a training section (saved with the weights)."""
        return {"name": section.network, "in_channels": self.channels, "num_classes": self.num_classes,
                "image_size": self.classifier_size, **self.stats, **section.model_overrides()}

    def new_classifier(self, spec: dict, name: str) -> torch.nn.Module:
        """A freshly initialised classifier whose weights depend only on (run seed, name)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, "init", name))
            return build_classifier(**spec).to(self.device)

    # --- who trains a cached classifier (TrainSection.distributed) ----------------------
    def together(self, section: TrainSection) -> bool:
        """All ranks train this classifier with DDP, rather than the main process alone."""
        return section.distributed and self.runtime.world > 1

    def must_train(self, section: TrainSection, path: Path) -> bool:
        """Whether this rank takes part in training the classifier cached at `path`."""
        if not self.together(section):
            return self.runtime.is_main and not path.exists()
        return not self.runtime.share(path.exists())  # the main process's view, so all ranks agree

    def trained_classifier(self, name: str, section: TrainSection, data, ipc: int | None) -> torch.nn.Module:
        """Train (main process, or all with DDP) or load the cached classifier models/<name>.safetensors."""
        path = self.run / "models" / f"{name}.safetensors"
        if self.must_train(section, path):
            spec = self.spec(section)
            model = self.new_classifier(spec, name)
            log.info("training the %s classifier (%s, %s recipe)", name, section.network, section.recipe)
            train_classifier(model, data, section, ipc=ipc, classifier_size=self.classifier_size,
                             seed=derive_seed(self.config.seed, "classifier", name), device=self.device,
                             progress=self.progress, runtime=self.runtime if self.together(section) else None)
            if self.runtime.is_main:
                save_classifier(model, path, spec)
        self.runtime.barrier()
        return load_classifier(path, self.device)[0].requires_grad_(False)

    # --- generation ---------------------------------------------------------------------
    def generate(
        self,
        root: Path,
        stage: int,
        slots: range,
        memory: ClassMemory,
        tag: str,
        make_guidance: Callable[[list[int]], Guidance | None],
        kappa: int = 1,
        score: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
    ) -> None:
        """Fill `slots` of every class at `stage` under `root`, round by round.

        A round takes the next `sampling.round_slots` slots of every class; its candidates, in
        (class, slot, candidate) order, are cut into batches of whole kappa-groups of at most
        batch_size candidates (at least one group), which the processes share. The class
        memory is updated between rounds. Finished batches are skipped, so a rerun resumes
        where a run stopped.
        """
        per_class = self.config.sampling.round_slots
        per_batch = max(1, self.config.sampling.batch_size // kappa) * kappa
        rounds = [list(slots[s : s + per_class]) for s in range(0, len(slots), per_class)]
        bar = tqdm(total=len(slots) * self.num_classes, desc=f"{root.name} stage {stage}", unit="img",
                   disable=not self.progress)
        for chunk in rounds:
            # Batches are cut from all the round's jobs, finished or not, so a resumed run
            # recomputes an unfinished batch exactly as the first run composed it.
            jobs = [(c, slot, cand) for c in range(self.num_classes) for slot in chunk for cand in range(kappa)]
            batches = [jobs[b : b + per_batch] for b in range(0, len(jobs), per_batch)]
            batches = [batch for batch in batches
                       if not all((root / record_name(stage, c, slot)).exists() for c, slot, _ in batch)]
            done = [item for batch in batches[self.runtime.rank :: self.runtime.world]
                    for item in self.generate_batch_or_explain(stage, batch, tag, make_guidance, kappa, score)]
            self.write(root, self.runtime.gather(done))
            for c in range(self.num_classes):  # every rank: the same memory, read back from the files
                for s in chunk:
                    memory.add(c, load_file(str(root / latent_name(stage, c, s)))["latent"])
            bar.update(len(chunk) * self.num_classes)
        bar.close()

    def write(self, root: Path, finished: list[Finished]) -> None:
        """The main process writes PNG, latent and (last) record of each image; all ranks wait."""
        if self.runtime.is_main:
            for f in finished:
                write_png(root / image_name(f.stage, f.cls, f.slot), f.image)
                write_tensors(root / latent_name(f.stage, f.cls, f.slot), {"latent": f.latent})
                write_json(root / record_name(f.stage, f.cls, f.slot), f.record)
        self.runtime.barrier()

    def sample_candidates(self, seeds: list[int], classes: list[int], guidance: Guidance | None):
        """Final latents for the seeds, and the rows whose guidance or result was not finite.
        The fast engine denoises them as one batch; the reference engine one at a time."""
        rows = [list(range(len(seeds)))] if self.config.sampling.engine == "fast" else [[r] for r in range(len(seeds))]
        latents, failed = [], set()
        for batch in rows:
            targets = torch.tensor([classes[r] for r in batch], device=self.device)
            labels = torch.tensor([self.dit_classes[classes[r]] for r in batch], device=self.device)
            noise = NoiseStream([seeds[r] for r in batch], self.device)
            with torch.no_grad():
                latents.append(self.generator.sampler.sample(labels, noise, guidance, targets=targets))
            if guidance is not None:
                failed |= {batch[r] for r in guidance.nonfinite.pop_failed()}
        latents = torch.cat(latents)
        failed |= set((~torch.isfinite(latents.flatten(1)).all(dim=1)).nonzero().squeeze(1).tolist())
        return latents, failed

    def generate_batch_or_explain(self, stage, jobs, tag, make_guidance, kappa, score) -> list[Finished]:
        """generate_batch, with running out of device memory said in one line with what to change."""
        try:
            return self.generate_batch(stage, jobs, tag, make_guidance, kappa, score)
        except torch.OutOfMemoryError:
            raise LgdError(out_of_memory_message(self.device, len(jobs), kappa, self.config.sampling.batch_size)) from None

    def generate_batch(self, stage, jobs, tag, make_guidance, kappa, score) -> list[Finished]:
        """Sample the (class, slot, candidate) jobs, redraw NaN/inf candidates, keep each group's top S."""
        seed = self.config.seed
        classes = [c for c, _, _ in jobs]
        seeds = [derive_seed(seed, tag, stage, *job, 0) for job in jobs]
        guidance = make_guidance(sorted(set(classes)))
        latents, failed = self.sample_candidates(seeds, classes, guidance)
        for attempt in range(1, MAX_REDRAWS + 1):
            if not failed:
                break
            rows = sorted(failed)
            log.warning("stage %d: redrawing %d non-finite candidate(s) (attempt %d)", stage, len(rows), attempt)
            for r in rows:
                seeds[r] = derive_seed(seed, tag, stage, *jobs[r], attempt)
            redrawn, bad = self.sample_candidates([seeds[r] for r in rows], [classes[r] for r in rows], guidance)
            latents[rows] = redrawn
            failed = {rows[b] for b in bad}
        if failed:
            raise LgdError(f"stage {stage}: candidates kept producing NaN/inf after {MAX_REDRAWS} redraws")

        targets = torch.tensor(classes, device=self.device)
        with torch.no_grad():
            images = self.generator.codec.decode(latents).clamp(0, 1)
        if score is not None:
            s_all, ce_s, ce_r = score(images, targets)
            winners = top1_per_group(s_all, kappa).tolist()
        else:
            winners = list(range(0, len(jobs), kappa))
        finished = []
        for w in winners:
            cls, slot, cand = jobs[w]
            record = {"file": image_name(stage, cls, slot), "stage": stage, "class": cls, "slot": slot,
                      "seed": seeds[w], "candidate": cand, "kind": tag}
            if score is not None:
                group = slice(w - cand, w - cand + kappa)
                record.update(S=s_all[w].item(), ce_student=ce_s[w].item(), ce_reference=ce_r[w].item(),
                              candidate_S=s_all[group].tolist())
            finished.append(Finished(stage, cls, slot, images[w].cpu(), latents[w].cpu(), record))
        return finished

    # --- the three seed methods and LGD --------------------------------------------------
    def influence_guidance(self, memory: ClassMemory) -> Callable[[list[int]], InfluenceGuidance]:
        loss = self.influence_loss()
        g = self.config.igd
        reference = self.config.sampling.engine == "reference"
        return lambda classes: InfluenceGuidance(
            codec=self.generator.codec, loss=loss, alphas_cumprod=self.generator.alphas_cumprod,
            k=g.k, rho_scale=g.rho_scale, window=g.window,
            deviation=Deviation(memory, g.gamma, self.device, classes=classes),
            classifier_size=self.surrogate_size, reference=reference, decode_rows=g.decode_rows)

    @property
    def surrogate_size(self) -> int:
        """The surrogate's input size: the classifiers', or the generator's under the official protocol."""
        official = self.config.igd.surrogate_protocol == "official"
        return self.config.data.image_size if official else self.classifier_size

    def influence_loss(self) -> InfluenceLoss:
        """IGD's surrogate trajectory, checkpoint selection and class targets (main process, cached)."""
        if getattr(self, "_influence", None) is not None:
            return self._influence
        g = self.config.igd
        official = g.surrogate_protocol == "official"
        section = dataclasses.replace(g.surrogate, recipe="augmented") if official else g.surrogate
        size = self.surrogate_size
        path = self.run / "models" / "surrogate.safetensors"
        spec = {**self.spec(section), "image_size": size}
        model = self.new_classifier(spec, "surrogate").eval()
        training = self.must_train(section, path)
        if training:
            trajectory: list[dict] = []
            snapshot = lambda epoch, m: trajectory.append({k: v.detach().clone() for k, v in m.named_parameters()})
            log.info("training IGD's surrogate trajectory (%s, %s recipe, %s epochs)", section.network,
                     section.recipe, section.epochs)
            train_classifier(model, self.train_set, section, classifier_size=size,
                             seed=derive_seed(self.config.seed, "surrogate"), device=self.device,
                             on_epoch=snapshot, progress=self.progress,
                             runtime=self.runtime if self.together(section) else None)
        if official:
            # The official code trains on ImageNet-normalised images but guides with [-1, 1] ones
            # (real targets and decoded images alike): kept as it is, inconsistency included.
            with torch.no_grad():
                model.mean.fill_(0.5)
                model.std.fill_(0.5)
        if training and self.runtime.is_main:
            model.eval()
            indices = per_class_subset(self.train_set, g.target_images,
                                       torch.Generator().manual_seed(derive_seed(self.config.seed, "targets")))
            images, labels = self.real_batch(indices, size)
            kept, targets = select_checkpoints(model, trajectory, images, labels, self.num_classes,
                                               g.checkpoints, g.cos_threshold)
            tensors = {f"{n}/{k}": v for n, e in enumerate(kept) for k, v in trajectory[e].items()}
            write_tensors(path, {**tensors, "targets": targets, "kept": torch.tensor(kept)}, {"spec": spec})
        self.runtime.barrier()
        tensors = load_file(str(path), device=str(self.device))
        checkpoints = [{k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{n}/")}
                       for n in range(tensors["kept"].numel())]
        self._influence = InfluenceLoss(model.requires_grad_(False), checkpoints, tensors["targets"],
                                        compile=self.config.sampling.compile)
        return self._influence

    def real_batch(self, indices: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.train_set[int(i)] for i in indices]
        images = torch.stack([p[0] for p in pairs]).to(self.device)
        labels = torch.tensor([p[1] for p in pairs], device=self.device)
        return to_classifier_input(images, size), labels

    def write_real(self, root: Path, stage: int, slots: range, memory: ClassMemory) -> None:
        """The 'random real' seed: real images of each class, stored like generated ones."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "random-real", stage))
        indices = per_class_subset(self.train_set, len(slots), generator)
        finished = []
        for n, i in enumerate(indices.tolist()):
            image, cls = self.train_set[i]
            slot = slots[n % len(slots)]
            if self.runtime.is_main and not (root / record_name(stage, cls, slot)).exists():
                with torch.no_grad():
                    latent = self.generator.codec.encode(image[None].to(self.device))[0].cpu()
                record = {"file": image_name(stage, cls, slot), "stage": stage, "class": cls, "slot": slot,
                          "kind": "random", "real_index": i}
                finished.append(Finished(stage, cls, slot, image, latent, record))
        self.write(root, finished)
        for cls in range(self.num_classes):
            for slot in slots:
                memory.add(cls, load_file(str(root / latent_name(stage, cls, slot)))["latent"])

    def seed_increment(self, root: Path, method: str, slots: range, memory: ClassMemory) -> None:
        if method == "random":
            self.write_real(root, 1, slots, memory)
        elif method == "dit":
            self.generate(root, 1, slots, memory, "dit", lambda classes: None)
        else:
            self.generate(root, 1, slots, memory, "igd", self.influence_guidance(memory))

    def lgd_stage(self, stage: int, memory: ClassMemory, reference: torch.nn.Module) -> None:
        c = self.config
        inc = c.stages.increment
        synthetic = load_synthetic(self.run, stages=list(range(1, stage)))
        student = self.trained_classifier(f"stage_{stage:02d}", c.lgd.stage_model,
                                          (synthetic.images, synthetic.labels), ipc=inc * (stage - 1))

        def score(images, labels):
            with torch.no_grad():
                x = to_classifier_input(images, self.classifier_size)
                return learnability(student, reference, x, labels, c.lgd.omega)

        make = lambda classes: LearnabilityGuidance(
            codec=self.generator.codec, student=student, reference=reference,
            alphas_cumprod=self.generator.alphas_cumprod, omega=c.lgd.omega, lam=c.lgd.lam,
            rho_scale=c.lgd.rho_scale, window=c.lgd.window,
            deviation=Deviation(memory, c.lgd.gamma, self.device, classes=classes),
            classifier_size=self.classifier_size)
        self.generate(self.run, stage, range((stage - 1) * inc, stage * inc), memory, "lgd", make, c.lgd.kappa, score)

    def baseline(self, name: str) -> None:
        """A full-IPC set of one baseline method under baselines/<name>; shares the seed stage's files."""
        root = self.run / "baselines" / name
        if name == self.config.stages.seed and self.runtime.is_main:
            for record in sorted((self.run / "records" / "01").glob("*.json")):
                cls, slot = (int(p) for p in record.stem.split("-"))
                for rel in (image_name(1, cls, slot), latent_name(1, cls, slot), record_name(1, cls, slot)):
                    _link(self.run / rel, root / rel)
        self.runtime.barrier()
        self.seed_increment(root, name, range(self.config.stages.ipc), ClassMemory(self.config.lgd.memory))

    # --- the whole run ------------------------------------------------------------------
    def run_all(self) -> Path:
        s = self.config.sampling
        kernels = "torch" if s.engine == "reference" else resolve_mode(s.kernels)  # reference: plain ops only
        try:
            with kernel_mode(kernels), tf32(s.tf32):
                self._run_stages()
        finally:
            self.runtime.shutdown()
        return self.run

    def _run_stages(self) -> None:
        """The staged loop of the module docstring."""
        self.prepare()
        c = self.config
        memory = ClassMemory(c.lgd.memory)
        self.seed_increment(self.run, c.stages.seed, range(c.stages.increment), memory)
        if self.stages > 1:
            reference = self.trained_classifier("reference", c.lgd.reference_model, self.train_set, ipc=None)
            for stage in range(2, self.stages + 1):
                self.lgd_stage(stage, memory, reference)
        for name in c.eval.baselines:
            if name != "random":
                self.baseline(name)
        if self.runtime.is_main:
            write_json(self.run / "done.json", {"images": c.stages.ipc * self.num_classes, "stages": self.stages})


def out_of_memory_message(device: torch.device, candidates: int, kappa: int, batch_size: int) -> str:
    """What to do after a sampling batch ran out of device memory (the run resumes where it stopped)."""
    where = str(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        where += f" ({total:.0f} GiB)"
    smaller = max(1, batch_size // 2 // kappa) * kappa
    if candidates <= kappa:
        return (f"out of memory on {where} sampling one group of {candidates} candidates (lgd.kappa={kappa}): "
                "a batch holds at least one group; lower lgd.kappa, use sampling.precision=bf16 without "
                "sampling.fp32_guidance, or a device with more memory")
    return (f"out of memory on {where} sampling a batch of {candidates} candidates (sampling.batch_size="
            f"{batch_size}); rerun the same command with sampling.batch_size={smaller}: finished images are kept "
            "and the run resumes where it stopped")


def _link(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a finished file into a baseline folder, atomically."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
