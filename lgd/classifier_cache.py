"""The classifiers a run trains once and keeps under models/: theta*, the stage models, and
IGD's surrogate trajectory. Each is trained by the main process alone, or by all processes
together (DDP) where its section says `distributed`, and then loaded by every rank."""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
from safetensors.torch import load_file

from lgd.checkpoints import load_classifier, save_classifier
from lgd.classifiers import ClassifierFactory, build_seeded
from lgd.config import Config, TrainSection
from lgd.data import per_class_subset
from lgd.files import write_json, write_tensors
from lgd.guidance import InfluenceLoss, select_checkpoints
from lgd.rundir import RunDir
from lgd.runtime import Runtime
from lgd.seeding import derive_seed
from lgd.training import train_classifier

log = logging.getLogger(__name__)


class ClassifierCache:
    def __init__(self, run: RunDir, runtime: Runtime, factory: ClassifierFactory, config: Config,
                 device: torch.device, progress: bool = True, track=None):
        self.run, self.runtime, self.factory, self.config = run, runtime, factory, config
        self.device, self.progress = device, progress
        self.track = track  # (values, step) -> None: the run's tracker, if any

    def spec(self, section: TrainSection, image_size: int | None = None) -> dict:
        return self.factory.spec(section.network, image_size, **section.model_overrides())

    def new(self, spec: dict, name: str) -> torch.nn.Module:
        """A freshly initialised classifier whose weights depend only on (run seed, name)."""
        return build_seeded(spec, derive_seed(self.config.seed, "init", name)).to(self.device)

    # --- who trains (TrainSection.distributed) -------------------------------------------
    def together(self, section: TrainSection) -> bool:
        """All ranks train this classifier with DDP, rather than the main process alone."""
        return section.distributed and self.runtime.world > 1

    def must_train(self, section: TrainSection, name: str) -> bool:
        """Whether this rank takes part in training the classifier cached as `name`."""
        exists = self.runtime.is_main and self.run.has_model(name)  # only the main process reads it here
        if not self.together(section):
            return self.runtime.is_main and not exists
        return not self.runtime.share(exists)  # the main process's view, so all ranks agree

    def _train(self, model, data, section: TrainSection, name: str, seed_parts: tuple, **kwargs) -> None:
        """Train, then keep the history (per-epoch loss and LR) as models/<name>.history.json; the time
        taken goes to the log (the run's files stay the same from run to run)."""
        start = time.perf_counter()
        history = train_classifier(model, data, section, seed=derive_seed(self.config.seed, *seed_parts),
                                   device=self.device, progress=self.progress,
                                   runtime=self.runtime if self.together(section) else None, **kwargs)
        seconds = time.perf_counter() - start
        log.info("trained the %s classifier in %.1f s (%d epochs)", name, seconds, history.epochs)
        if self.runtime.is_main and self.track is not None:
            for epoch, loss in enumerate(history.loss, 1):
                self.track({f"training/{name}/loss": loss}, epoch)
        if self.runtime.is_main:
            write_json(self.run.model_path(name).with_suffix(".history.json"),
                       {"epochs": history.epochs, "loss": history.loss, "lr": history.lr,
                        "network": section.network, "recipe": section.recipe})

    # --- the cached classifiers ----------------------------------------------------------
    def classifier(self, name: str, section: TrainSection, data, ipc: int | None) -> torch.nn.Module:
        """Train (main process, or all with DDP) or load the cached models/<name>.safetensors."""
        path = self.run.model_path(name)
        if self.must_train(section, name):
            spec = self.spec(section)
            model = self.new(spec, name)
            log.info("training the %s classifier (%s, %s recipe)", name, section.network, section.recipe)
            self._train(model, data, section, name, ("classifier", name), ipc=ipc)
            if self.runtime.is_main:
                save_classifier(model, path, spec)
        self.runtime.barrier()
        return load_classifier(path, self.device)[0].requires_grad_(False)

    def influence_loss(self, train_set) -> InfluenceLoss:
        """IGD's surrogate trajectory, checkpoint selection and class targets (main process, cached)."""
        c, g = self.config, self.config.igd
        official = g.surrogate_protocol == "official"
        # The official code trains the surrogate with hard-label augmentation at the generator's size.
        section = dataclasses.replace(g.surrogate, recipe="augmented") if official else g.surrogate
        spec = self.spec(section, c.data.image_size if official else None)
        model = self.new(spec, "surrogate").eval()
        training = self.must_train(section, "surrogate")
        if training:
            trajectory: list[dict] = []
            snapshot = lambda epoch, m: trajectory.append({k: v.detach().clone() for k, v in m.named_parameters()})
            log.info("training IGD's surrogate trajectory (%s, %s recipe, %s epochs)", section.network,
                     section.recipe, section.epochs)
            self._train(model, train_set, section, "surrogate", ("surrogate",), on_epoch=snapshot)
        if official:
            # The official code trains on ImageNet-normalised images but guides with [-1, 1] ones
            # (real targets and decoded images alike): kept as it is, inconsistency included.
            with torch.no_grad():
                model.mean.fill_(0.5)
                model.std.fill_(0.5)
        path = self.run.model_path("surrogate")
        if training and self.runtime.is_main:
            model.eval()
            indices = per_class_subset(train_set, g.target_images,
                                       torch.Generator().manual_seed(derive_seed(c.seed, "targets")))
            pairs = [train_set[int(i)] for i in indices]
            images = torch.stack([p[0] for p in pairs]).to(self.device)
            labels = torch.tensor([p[1] for p in pairs], device=self.device)
            kept, targets = select_checkpoints(model, trajectory, images, labels, self.factory.num_classes,
                                               g.checkpoints, g.cos_threshold)
            tensors = {f"{n}/{k}": v for n, e in enumerate(kept) for k, v in trajectory[e].items()}
            write_tensors(path, {**tensors, "targets": targets, "kept": torch.tensor(kept)}, {"spec": spec})
        self.runtime.barrier()
        tensors = load_file(str(path), device=str(self.device))
        checkpoints = [{k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{n}/")}
                       for n in range(tensors["kept"].numel())]
        return InfluenceLoss(model.requires_grad_(False), checkpoints, tensors["targets"], compile=c.sampling.compile)
