"""The LGD distillation run (docs/method.md §3): initial increment, then learnability-guided stages.

    D_1 = initial increment (IGD, plain DiT or random real)
    theta* = reference classifier trained on the real data
    for stage k = 2 .. K:
        theta_{k-1} = classifier trained from scratch on D_{k-1}
        for each class and new slot: kappa learnability-guided candidates, keep the top S
    plus the evaluation baselines (plain DiT and IGD sets of the full IPC).

Work runs in rounds (lgd/planning.py): the next `sampling.round_slots` slots of every class,
all their candidates, cut into batches of whole kappa-groups. Everything a batch does depends
only on its seeds and on the class memory before the round, so a resumed run recomputes an
interrupted batch bit for bit and skips finished ones. The memory is updated after each
round; with the default of one slot per round every image sees all earlier images of its
class, as in the papers' code (which makes one image at a time), while the batch spans classes.

Who does what: the run directory (lgd/rundir.py) owns the files and the lock, the candidate
generator (lgd/candidates.py) samples, redraws and ranks a batch, the classifier cache
(lgd/classifier_cache.py) trains and keeps the classifiers, lgd/guidance/factory.py builds the
guidance, and Runtime (lgd/runtime.py) coordinates the processes.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from lgd.acceleration import tf32
from lgd.candidates import CandidateGenerator, load_generator, read_geometry
from lgd.classifier_cache import ClassifierCache
from lgd.classifiers import ClassifierFactory
from lgd.config import Config, Problems
from lgd.data import model_class_map, per_class_subset
from lgd.data.splits import load_split
from lgd.errors import ConfigError, LgdError, first_line
from lgd.guidance import ClassMemory, learnability
from lgd.guidance.factory import GuidanceFactory, guidance_factory
from lgd.kernels.policy import kernel_mode, resolve_mode
from lgd.planning import plan_rounds
from lgd.progress import RunProgress, progress_bar
from lgd.resume import claim, pin_environment
from lgd.rundir import Finished, RunDir, load_synthetic
from lgd.runtime import Runtime, compute_environment, pin_threads
from lgd.tracking import open_tracker
from lgd.seeding import derive_seed

log = logging.getLogger(__name__)

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


class Distiller:
    """One distillation run into a run directory, the staged loop of the module docstring.

    Rounds are split over the processes batch by batch; results are gathered, the main
    process writes them, and every rank rebuilds the class memory from the written latents.
    """

    def __init__(self, config: Config, run: str | Path, progress: bool = True):
        self.config = config
        self.run = RunDir(run)
        self.runtime = Runtime(config.distributed_timeout)
        self.progress = progress and self.runtime.is_main
        self.device = self.runtime.device_for(config.device)
        self.stages = config.stages.ipc // config.stages.increment

    def prepare(self) -> None:
        """Open the data and the weights (each loader names what is wrong with its file), then
        claim the run directory: a start that fails on its inputs leaves nothing behind."""
        c, rt = self.config, self.runtime
        dit_classes = self._open_inputs()
        self.candidates = CandidateGenerator(self.generator, dit_classes, self.device, engine=c.sampling.engine,
                                             seed=c.seed, batch_size=c.sampling.batch_size)
        factory = ClassifierFactory(self.train_set.channels, self.num_classes, c.data.classifier_input)
        self.classifiers = ClassifierCache(self.run, rt, factory, c, self.device, self.progress, track=self.track)
        self._threads = torch.get_num_threads()
        if c.threads:
            torch.set_num_threads(c.threads)  # recorded by the claim of a fresh run
        try:
            recorded = self._claim(dit_classes) if rt.is_main else None
        except LgdError as error:  # the others would wait for the claim forever: they stop with its reason
            rt.share({"refused": first_line(error)})
            raise
        recorded = rt.share(recorded)  # every rank waits for the claim
        if "refused" in recorded:
            raise ConfigError(recorded["refused"])
        self.run.folders = rt.share(self.run.folders)
        if not rt.is_main:
            self._log = self.run.open_log(rt.rank, rt.world)
        log.info("lgd %s, torch %s, %s, %d process(es), %d thread(s) each", recorded["lgd"], recorded["torch"],
                 self.device, rt.world, recorded["threads"])
        pin_threads(recorded["threads"])  # every rank computes with the run's thread count

    def _open_inputs(self) -> list[int]:
        """The training set and the generator, checked against each other; the DiT label of each class."""
        c = self.config
        problems = Problems()  # the data's and the checkpoints' problems, in one message
        with problems.collect(LgdError):
            self.train_set = load_split(c.data, "train")
        with problems.collect(LgdError):
            geometry = read_geometry(c)  # headers and configs only, no weights yet
        problems.raise_if_any()
        self.num_classes = self.train_set.num_classes
        dit_classes = model_class_map(self.train_set, geometry.dit.num_classes, "the DiT")
        if geometry.image_channels != self.train_set.channels:
            raise ConfigError(f"the generator makes {geometry.image_channels}-channel images, "
                              f"the dataset has {self.train_set.channels}")
        self.generator = load_generator(c, self.device, geometry)  # everything fits: now the weights
        return dit_classes

    def _claim(self, dit_classes: list[int]) -> dict:
        """The main process takes the run directory: lock, log, config (resume rules), class
        folders, repairs, the recorded environment (returned), the tracker."""
        c, run = self.config, self.run
        run.check_writable()
        run.lock()
        self._log = run.open_log(self.runtime.rank, self.runtime.world)
        run.remove_leftovers()
        claim(run, c)
        run.use_class_folders(self.train_set, dit_classes)
        run.repair()
        recorded = pin_environment(run, compute_environment(self.device, self.runtime.world))
        self.tracker = open_tracker(c.tracker, run.path, c.to_dict())
        warn_deviation_scale(c, self.generator.sampler.latent_shape)
        return recorded

    # --- the whole run ------------------------------------------------------------------
    def run_all(self) -> Path:
        s = self.config.sampling
        kernels = "torch" if s.engine == "reference" else resolve_mode(s.kernels)  # reference: plain ops only
        try:
            with kernel_mode(kernels), tf32(s.tf32):
                self._run_stages()
        finally:
            self.close()
        return self.run.path

    def track(self, values: dict, step: int) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.log(values, step=step)

    def close(self) -> None:
        """Finish with the other processes, release the run directory, restore the thread count."""
        if getattr(self, "tracker", None) is not None:
            self.tracker.finish()
            self.tracker = None
        self.runtime.shutdown()
        self.run.release()
        if getattr(self, "_threads", None):
            torch.set_num_threads(self._threads)
        if getattr(self, "_log", None) is not None:
            self.run.close_log(self._log)
            self._log = None

    def _run_stages(self) -> None:
        self.prepare()
        c = self.config
        baselines = [name for name in c.eval.baselines if name != "random"]
        self.whole_run = RunProgress((c.stages.ipc + c.stages.ipc * len(baselines)) * self.num_classes,
                                     enabled=self.runtime.is_main)
        memory = ClassMemory(c.lgd.memory)
        self.initial_increment(self.run, c.stages.initial, range(c.stages.increment), memory)
        if self.stages > 1:
            reference = self.classifiers.classifier("reference", c.lgd.reference_model, self.train_set, ipc=None)
            for stage in range(2, self.stages + 1):
                self.lgd_stage(stage, memory, reference)
        for name in c.eval.baselines:
            if name != "random":
                self.baseline(name)
        if self.runtime.is_main:
            self.run.mark_done(c.stages.ipc * self.num_classes, self.stages)

    # --- the initial increment, the LGD stages and the baselines ---------------------------
    def initial_increment(self, root: RunDir, method: str, slots: range, memory: ClassMemory) -> None:
        if method == "random":
            self.write_real(root, 1, slots, memory)
        elif method == "dit":
            self.generate(root, 1, slots, memory, "dit", None)
        else:
            self.generate(root, 1, slots, memory, "igd", self.guidance("igd", memory))

    def lgd_stage(self, stage: int, memory: ClassMemory, reference: torch.nn.Module) -> None:
        c = self.config
        inc = c.stages.increment
        synthetic = load_synthetic(self.run.path, stages=list(range(1, stage)))
        student = self.classifiers.classifier(f"stage_{stage:02d}", c.lgd.stage_model,
                                              (synthetic.images, synthetic.labels), ipc=inc * (stage - 1))

        def score(images, labels, kappa):
            with torch.no_grad():
                return learnability(student, reference, images, labels, c.lgd.omega, kappa)

        make = self.guidance("lgd", memory, student=student, reference=reference)
        self.generate(self.run, stage, range((stage - 1) * inc, stage * inc), memory, "lgd", make, c.lgd.kappa, score)

    def baseline(self, name: str) -> None:
        """A full-IPC set of one baseline method under baselines/<name>; shares the initial stage's files."""
        root = self.run.sub(f"baselines/{name}")
        if name == self.config.stages.initial and self.runtime.is_main:
            root.share_initial_stage(self.run)
        self.runtime.barrier()
        self.initial_increment(root, name, range(self.config.stages.ipc), ClassMemory(self.config.lgd.memory))

    def guidance(self, kind: str, memory: ClassMemory, **models) -> GuidanceFactory:
        if kind == "igd":
            models["influence"] = self.influence_loss()
        return guidance_factory(kind, self.config, codec=self.generator.codec,
                                alphas_cumprod=self.generator.alphas_cumprod, memory=memory, device=self.device,
                                **models)

    def influence_loss(self):
        """IGD's surrogate (trained once per run, then kept in memory)."""
        if getattr(self, "_influence", None) is None:
            self._influence = self.classifiers.influence_loss(self.train_set)
        return self._influence

    # --- filling slots --------------------------------------------------------------------
    def generate(self, root: RunDir, stage: int, slots: range, memory: ClassMemory, tag: str,
                 make_guidance: GuidanceFactory | None, kappa: int = 1, score=None) -> None:
        """Fill `slots` of every class at `stage` under `root`, round by round; finished batches
        are skipped, so a rerun resumes where a run stopped."""
        s, rt = self.config.sampling, self.runtime
        bar = progress_bar(total=len(slots) * self.num_classes, desc=f"{root.name} stage {stage}", unit="img",
                           disable=not self.progress)
        start, made = time.perf_counter(), 0
        for round_ in plan_rounds(slots, self.num_classes, s.round_slots, s.batch_size, kappa):
            pending = [b for b in round_.batches if not all(root.is_finished(stage, c, slot) for c, slot, _ in b)]
            made += sum(len(b) for b in pending) // kappa
            done = []
            for batch in pending[rt.rank :: rt.world]:
                guidance = make_guidance(sorted({c for c, _, _ in batch})) if make_guidance else None
                done += self.candidates.batch(stage, batch, tag, guidance, kappa, score)
            self.write(root, rt.gather(done))
            for c in range(self.num_classes):  # every rank: the same memory, read back from the files
                for slot in round_.slots:
                    memory.add(c, root.latent(stage, c, slot))
            bar.update(len(round_.slots) * self.num_classes)
            self.whole_run.update(len(round_.slots) * self.num_classes, made=bool(pending))
        bar.close()
        if made and self.runtime.is_main:
            seconds = time.perf_counter() - start
            log.info("%s stage %d: %d image(s) made in %.1f s (%.2f images/s, %d candidates each)", root.name, stage,
                     made, seconds, made / seconds, kappa)
            self.track({f"sampling/{root.name}/images_per_s": made / seconds}, stage)

    def write(self, root: RunDir, finished: list[Finished]) -> None:
        """The main process writes; all ranks wait."""
        if self.runtime.is_main:
            root.write(finished)
        self.runtime.barrier()

    def write_real(self, root: RunDir, stage: int, slots: range, memory: ClassMemory) -> None:
        """The 'random real' seed: real images of each class, stored like generated ones."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "random-real", stage))
        indices = per_class_subset(self.train_set, len(slots), generator)
        finished = []
        for n, i in enumerate(indices.tolist()):
            image, cls = self.train_set[i]
            slot = slots[n % len(slots)]
            if self.runtime.is_main and not root.is_finished(stage, cls, slot):
                with torch.no_grad():
                    latent = self.generator.codec.encode(image[None].to(self.device))[0].cpu()
                record = {"stage": stage, "class": cls, "slot": slot, "kind": "random", "real_index": i}
                finished.append(Finished(stage, cls, slot, image, latent, record))
        self.write(root, finished)
        for cls in range(self.num_classes):
            for slot in slots:
                memory.add(cls, root.latent(stage, cls, slot))
        self.whole_run.update(len(slots) * self.num_classes, made=bool(finished))
